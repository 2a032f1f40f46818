"""The pure scheduler, driven with hand-made outputs (no model, no tensors)."""

from __future__ import annotations

import pytest

from server.engine.errors import InvalidRequest, QueueFull
from server.engine.scheduler import RowLeft, ScheduledRequest, Scheduler, SchedulerConfig, StepOutput
from tests.engine.conftest import SCHEDULER_LIMITS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def req(rid: str, prompt: int = 10, reserved: int | None = None) -> ScheduledRequest:
    return ScheduledRequest(rid, num_prompt_tokens=prompt, reserved_tokens=reserved or prompt + 10)


def make(**kw: float) -> tuple[Scheduler, Clock]:
    clock = Clock()
    return Scheduler(SchedulerConfig(**{**SCHEDULER_LIMITS, **kw}), clock=clock), clock  # type: ignore[arg-type]


def test_admits_fcfs_up_to_max_running_then_decodes() -> None:
    s, _ = make(max_running=2)
    for rid in "abc":
        s.add(req(rid))
    plan = s.schedule()
    assert plan.prefill_ids == ["a", "b"] and plan.decode_ids == []
    plan = s.schedule()
    assert plan.prefill_ids == [] and plan.decode_ids == ["a", "b"]
    assert s.update([StepOutput("a", finish_reason="length"), StepOutput("b")]) == ["a"]
    plan = s.schedule()
    assert plan.prefill_ids == ["c"] and plan.decode_ids == ["b"]


def test_chunked_prefill_splits_a_long_prompt_while_running_rows_keep_decoding() -> None:
    s, _ = make(max_prefill_tokens=100, chunked_prefill=True)
    s.add(req("a", prompt=10))
    s.schedule()  # "a" prefills whole
    s.add(req("long", prompt=250))
    s.add(req("b", prompt=30))
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        assert "a" in plan.decode_ids and "long" not in plan.decode_ids  # a decodes every step
        chunks.append([(c.request_id, c.start, c.end) for c in plan.prefill_chunks])
    assert chunks == [
        [("long", 0, 100)],
        [("long", 100, 200)],
        [("long", 200, 250), ("b", 0, 30)],  # the rest of the budget goes to the next request
    ]
    assert s.schedule().decode_ids == ["a", "long", "b"]


def test_prefill_token_limit_but_a_long_prompt_still_runs_alone() -> None:
    """Without chunking (BART), a prompt over the per-step limit is admitted alone as a step's first."""
    s, _ = make(max_prefill_tokens=100)
    s.add(req("a", prompt=60))
    s.add(req("b", prompt=60))
    s.add(req("huge", prompt=500))
    assert s.schedule().prefill_ids == ["a"]
    assert s.schedule().prefill_ids == ["b"]
    assert s.schedule().prefill_ids == ["huge"]  # over the per-step limit, admitted as the step's first


def test_kv_budget_blocks_head_and_never_lets_a_smaller_later_request_jump_ahead() -> None:
    s, _ = make(kv_budget_tokens=100)
    s.add(req("a", reserved=60))
    s.add(req("big", reserved=60))
    s.add(req("small", reserved=10))
    assert s.schedule().prefill_ids == ["a"]  # "big" does not fit; "small" would, but must wait
    assert s.kv_usage_ratio == pytest.approx(0.6)
    assert s.schedule().prefill_ids == []
    s.update([StepOutput("a", finish_reason="length")])
    assert s.schedule().prefill_ids == ["big", "small"]
    assert s.reserved_tokens == 70


def test_request_larger_than_the_whole_budget_is_refused_at_add() -> None:
    s, _ = make(kv_budget_tokens=50)
    with pytest.raises(InvalidRequest, match="KV budget of 50"):
        s.add(req("x", reserved=51))


def test_queue_full_counts_the_requests_beyond_the_free_rows() -> None:
    """max_waiting bounds what waits beyond the rows the next step fills: requests added while a
    step runs (rows free, not yet filled) are not refused for them."""
    s, _ = make(max_waiting=2, max_running=1)
    s.add(req("a"))  # takes the free row at the next schedule
    s.add(req("b"))
    s.add(req("c"))
    with pytest.raises(QueueFull):
        s.add(req("d"))
    s.schedule()  # a runs, b and c wait: the queue is full
    with pytest.raises(QueueFull):
        s.add(req("d"))
    s.abort("b", "aborted")
    s.add(req("d"))  # room again


def test_duplicate_request_id_refused() -> None:
    s, _ = make()
    s.add(req("a"))
    with pytest.raises(InvalidRequest, match="already in use"):
        s.add(req("a"))


def test_queue_timeout_drops_only_old_waiting_requests() -> None:
    s, clock = make(max_running=1, queue_timeout_s=5.0)
    s.add(req("a"))
    assert s.schedule().prefill_ids == ["a"]
    s.add(req("old"))
    clock.now += 4
    s.add(req("new"))
    clock.now += 2  # "old" waited 6 s, "new" 2 s
    plan = s.schedule()
    assert plan.left == [RowLeft("old", "timed_out", was_running=False)] and plan.decode_ids == ["a"]
    assert s.waiting_ids == ["new"]
    clock.now += 100  # running requests never time out
    plan = s.schedule()
    assert plan.left == [RowLeft("new", "timed_out", was_running=False)] and plan.decode_ids == ["a"]


def test_abort_waiting_and_running() -> None:
    s, _ = make(max_running=1)
    s.add(req("a"))
    s.add(req("b"))
    s.schedule()
    assert s.abort("b") and "b" not in s  # waiting: gone at once, nothing to free
    assert s.abort("a")
    assert s.reserved_tokens == 0
    plan = s.schedule()
    assert plan.left == [RowLeft("b", "aborted", False), RowLeft("a", "aborted", True)]
    assert plan.released_ids == ["a"] and plan.decode_ids == []  # reported once so the row is freed
    assert s.schedule().left == []
    assert not s.abort("a")
    # A step's output for a request aborted meanwhile is ignored.
    assert s.update([StepOutput("a", finish_reason="length")]) == []


def test_every_departure_is_reported_once_with_its_reason() -> None:
    s, clock = make(max_running=3, queue_timeout_s=5.0)
    for rid in ("eos", "stop", "failed"):
        s.add(req(rid))
    s.schedule()
    s.add(req("waits"))  # no free row: it waits, then times out
    s.update([StepOutput("eos", finish_reason="eos"), StepOutput("stop", finish_reason="stop")])
    s.abort("failed", "failed")
    clock.now += 6
    plan = s.schedule()
    assert plan.left == [
        RowLeft("eos", "eos", True),
        RowLeft("stop", "stop", True),
        RowLeft("failed", "failed", True),
        RowLeft("waits", "timed_out", False),
    ]
    assert plan.released_ids == ["eos", "stop", "failed"]
    assert s.reserved_tokens == 0 and s.num_running == 0
    assert s.schedule().left == []


def test_a_request_whose_prefix_loads_keeps_its_place_while_resident_ones_run() -> None:
    s, _ = make(max_running=2)
    loading = req("loading")
    loading.prefix_ready = False
    s.add(loading)
    s.add(req("resident"))
    plan = s.schedule()
    assert plan.prefill_ids == ["resident"]  # not stalled behind the load
    assert s.waiting_ids == ["loading"]
    s.add(req("later"))
    s.mark_ready("loading")
    assert s.schedule().prefill_ids == ["loading"]  # ahead of "later", which arrived after it
    assert s.waiting_ids == ["later"]


def test_nothing_to_do_while_the_only_waiting_request_loads_its_prefix() -> None:
    s, _ = make()
    loading = req("loading")
    loading.prefix_ready = False
    s.add(loading)
    assert not s.has_work()  # the engine sleeps until the prefetch wakes it
    s.mark_ready("loading")
    assert s.has_work()

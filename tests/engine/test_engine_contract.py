"""The engine's contract: `add_request` raises admission errors and returns a handle that
streams and aborts; departures are reported with their reasons; prefixes are prefetched while
requests wait, so a load never holds back requests of resident tasks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from server.engine import (
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    RequestHandle,
    StoreUnavailable,
    UnknownTask,
)
from server.engine.scheduler import RowLeft
from tests.engine.conftest import collect, greedy
from tests.engine.test_engine_behaviour import wait_until

PROMPT = "Once upon a time, in a land far away,"


async def test_add_request_raises_admission_errors_itself(make_engine: Any, store: Any) -> None:
    async with make_engine(store, max_batch_size=1, max_waiting=1) as engine:
        unknown = await engine.add_request(GenerationRequest("u", PROMPT, greedy(2), task="no-such-task"))
        with pytest.raises(UnknownTask):  # known after a store read: the handle's first iteration
            await anext(unknown)
        with pytest.raises(PromptTooLong):
            await engine.add_request(GenerationRequest("p", list(range(2000)), greedy(2)))
        running = await engine.add_request(GenerationRequest("run", PROMPT, greedy(400, ignore_eos=True)))
        await anext(running)  # the only row is taken
        waiting = await engine.add_request(GenerationRequest("wait", PROMPT, greedy(2)))
        with pytest.raises(QueueFull):
            await engine.add_request(GenerationRequest("full", PROMPT, greedy(2)))
        running.abort()
        assert [e.token_id is not None for e in [e async for e in waiting]] == [True, True]


async def test_handle_streams_events_and_abort_ends_it_and_frees_its_row(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        alone = await collect(engine, GenerationRequest("alone", PROMPT, greedy(5), task="task-5"))
        handle = await engine.add_request(
            GenerationRequest("h", PROMPT, greedy(400, ignore_eos=True), task="task-5")
        )
        assert isinstance(handle, RequestHandle)
        other = asyncio.create_task(collect(engine, GenerationRequest("o", PROMPT, greedy(5), task="task-5")))
        first = await anext(handle)
        assert handle.prefix_version == first.prefix_version == 1
        handle.abort()
        rest = [e async for e in handle]
        assert first.finish_reason is None and rest[-1].finish_reason == "cancelled"
        assert len(rest) < 400  # it ended early
        assert [e.token_id for e in await other] == [e.token_id for e in alone]  # others unaffected
        await wait_until(lambda: engine.runner.request_ids == [] and engine.num_running == 0)


async def test_every_request_leaves_with_its_reason_and_its_row_is_freed(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store, max_batch_size=2, queue_timeout_s=0.3) as engine:
        left = record_departures(engine)
        slow_steps(engine)  # the long requests outlast the test
        aborted = await engine.add_request(GenerationRequest("aborted", PROMPT, greedy(400, ignore_eos=True)))
        await anext(aborted)
        finished = await collect(engine, GenerationRequest("length", PROMPT, greedy(3, ignore_eos=True)))
        blocker = await engine.add_request(GenerationRequest("blocker", PROMPT, greedy(400, ignore_eos=True)))
        await anext(blocker)  # both rows taken
        with pytest.raises(QueueTimeout):
            await collect(engine, GenerationRequest("timed-out", PROMPT, greedy(2)))
        aborted.abort()
        blocker.abort()
        await wait_until(lambda: engine.runner.request_ids == [])
        await wait_until(lambda: len(left) == 4)
    assert finished[-1].finish_reason == "length"
    assert sorted(left, key=lambda row: row.request_id) == [
        RowLeft("aborted", "aborted", True),
        RowLeft("blocker", "aborted", True),
        RowLeft("length", "length", True),
        RowLeft("timed-out", "timed_out", False),
    ]


def slow_steps(engine: Any, seconds: float = 0.01) -> None:
    """Make every model step take at least `seconds` (400 tokens: >= 4 s), whatever the machine."""
    real_step = engine.runner.step

    def step(*args: Any) -> Any:
        time.sleep(seconds)
        return real_step(*args)

    engine.runner.step = step


def slow_transfers(engine: Any, seconds: float, loaded: list[str]) -> None:
    """Make host->device copies of prefixes slow (the real copy, after a delay), noting each one."""
    transfer = engine.prefix_cache.transfer
    real_to_device = transfer.to_device

    def to_device(artifact: Any) -> Any:
        time.sleep(seconds)  # a worker thread: the event loop keeps running
        loaded.append(artifact.metadata.task)
        return real_to_device(artifact)

    transfer.to_device = to_device


async def test_resident_tasks_are_served_while_another_tasks_prefix_loads(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        await collect(engine, GenerationRequest("warm", PROMPT, greedy(1), task="task-5"))  # now resident
        loaded: list[str] = []
        slow_transfers(engine, 1.0, loaded)
        store.get_delay_s = 0.3  # the store is slow too
        cold = asyncio.create_task(
            collect(engine, GenerationRequest("cold", PROMPT, greedy(3, ignore_eos=True), task="task-10"))
        )
        hot = await collect(
            engine, GenerationRequest("hot", PROMPT, greedy(8, ignore_eos=True), task="task-5")
        )
        assert loaded == []  # "hot" was served start to end while "cold"'s prefix was still loading
        cold_events = await cold
        assert hot[-1].finish_reason == "length" and len(hot) == 8
        assert loaded == ["task-10"]  # loaded once, through the host tier to the device
        assert cold_events[-1].finish_reason == "length"
        assert engine.prefix_cache.cached_versions("device")[-1] == ("default", "task-10", 1)
        later = await collect(
            engine, GenerationRequest("later", PROMPT, greedy(3, ignore_eos=True), task="task-10")
        )
        assert [e.token_id for e in later] == [e.token_id for e in cold_events]
        assert loaded == ["task-10"]  # resident now: no second copy


async def test_a_waiting_requests_prefix_is_loaded_before_it_is_admitted(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store, max_batch_size=1) as engine:
        loaded: list[str] = []
        slow_transfers(engine, 0.2, loaded)
        slow_steps(engine)  # "run" holds the only row for >= 4 s
        seen_at_ready: list[tuple[list[str], list[str]]] = []
        real_mark_ready = engine.scheduler.mark_ready

        def mark_ready(request_id: str) -> None:
            seen_at_ready.append((engine.scheduler.running_ids, engine.scheduler.waiting_ids))
            real_mark_ready(request_id)

        engine.scheduler.mark_ready = mark_ready  # type: ignore[method-assign]
        running = await engine.add_request(GenerationRequest("run", PROMPT, greedy(400, ignore_eos=True)))
        await anext(running)  # the only row is taken
        waiting = await engine.add_request(
            GenerationRequest("wait", PROMPT, greedy(2, ignore_eos=True), task="task-10")
        )
        await wait_until(lambda: loaded == ["task-10"] and seen_at_ready != [])
        assert seen_at_ready == [(["run"], ["wait"])]  # its prefix arrived while it waited for a row
        running.abort()
        assert [e.finish_reason for e in [e async for e in waiting]] == [None, "length"]


async def test_a_loading_prefix_does_not_hold_back_a_later_resident_request(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store, max_batch_size=1) as engine:
        await collect(engine, GenerationRequest("warm", PROMPT, greedy(1), task="task-5"))
        loaded: list[str] = []
        slow_transfers(engine, 1.0, loaded)
        cold = await engine.add_request(
            GenerationRequest("cold", PROMPT, greedy(2, ignore_eos=True), task="task-10")
        )
        hot = await collect(
            engine, GenerationRequest("hot", PROMPT, greedy(4, ignore_eos=True), task="task-5")
        )
        assert hot[-1].finish_reason == "length"
        assert loaded == []  # "hot" arrived after "cold" and finished before "cold"'s prefix was there
        assert [e.finish_reason for e in [e async for e in cold]] == [None, "length"]


async def test_a_request_whose_prefix_never_arrives_times_out_in_the_queue(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store, queue_timeout_s=0.3) as engine:
        slow_transfers(engine, 3.0, [])
        started = time.monotonic()
        with pytest.raises(QueueTimeout):
            await collect(engine, GenerationRequest("stuck", PROMPT, greedy(2), task="task-10"))
        assert time.monotonic() - started < 2.0  # not when the copy finally ends
        assert engine.num_waiting == 0 and engine.healthy


async def test_more_tasks_than_the_device_tier_holds_all_answer_as_alone(
    make_engine: Any, store: Any, artifacts: dict[int, Any]
) -> None:
    tasks = ["task-1", "task-5", "task-10"]
    one = artifacts[10].nbytes  # room for one of them on the device: prefixes move in and out
    async with make_engine(store, device_prefix_cache_bytes=one, host_prefix_cache_bytes=1 << 30) as engine:
        alone = {
            t: await collect(engine, GenerationRequest(f"alone-{t}", PROMPT, greedy(6), task=t))
            for t in tasks
        }
        together = await asyncio.gather(
            *(
                collect(engine, GenerationRequest(f"r{i}", PROMPT, greedy(6), task=tasks[i % 3]))
                for i in range(12)
            )
        )
        stats = engine.prefix_cache_stats
        assert stats is not None and stats.loads == 3  # read from the store once each, then the tiers
        assert stats.evictions["device"] > 0
    for i, events in enumerate(together):
        assert [e.token_id for e in events] == [e.token_id for e in alone[tasks[i % 3]]]


async def test_a_store_read_holds_back_neither_the_caller_nor_other_tasks(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        warm = await collect(
            engine, GenerationRequest("warm", PROMPT, greedy(8, ignore_eos=True), task="task-5")
        )
        store.gate = asyncio.Event()  # from now on a store read blocks until the test lets it go
        started = time.monotonic()
        cold = await asyncio.wait_for(
            engine.add_request(GenerationRequest("cold", PROMPT, greedy(3, ignore_eos=True), task="task-10")),
            timeout=5,
        )
        assert time.monotonic() - started < 0.5  # queued at once; its store read goes on meanwhile
        hot = await collect(
            engine, GenerationRequest("hot", PROMPT, greedy(8, ignore_eos=True), task="task-5")
        )
        assert [e.token_id for e in hot] == [e.token_id for e in warm]  # streamed while the read blocked
        assert engine.num_waiting == 1 and store.get_calls == 2
        store.gate.set()
        cold_events = [e async for e in cold]
        assert [e.finish_reason for e in cold_events] == [None, None, "length"]
        assert cold.prefix_version == cold_events[0].prefix_version == 1


class FinishCounter:
    """An engine observer that records every finish it is told of."""

    def __init__(self) -> None:
        self.finishes: list[tuple[str, str | None]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None

    def on_finish(self, reason: str, *args: Any) -> None:
        self.finishes.append((reason, args[-1]))


@pytest.mark.parametrize("failure", ["store down", "unknown task", "store hangs"])
async def test_a_failing_store_read_fails_that_request_alone_with_a_clear_error(
    make_engine: Any, store: Any, failure: str
) -> None:
    observer = FinishCounter()
    async with make_engine(store, observer=observer, queue_timeout_s=0.5) as engine:
        task, error = "task-10", StoreUnavailable
        if failure == "store down":
            store.fail_with = StoreUnavailable("connection refused")
        elif failure == "unknown task":
            task, error = "no-such-task", UnknownTask
        else:
            store.gate, error = asyncio.Event(), QueueTimeout  # never set: the read never returns
        handle = await asyncio.wait_for(
            engine.add_request(GenerationRequest("bad", PROMPT, greedy(2), task=task)), timeout=5
        )
        with pytest.raises(error):
            await asyncio.wait_for(anext(handle), timeout=5)
        assert [e async for e in handle] == []  # ended: nothing after the error
        assert engine.healthy and engine.num_waiting == 0
        ok = await collect(engine, GenerationRequest("ok", PROMPT, greedy(2, ignore_eos=True)))
        assert ok[-1].finish_reason == "length"
    # a refusal is not a finished request; a timeout in the queue is one, as before
    assert observer.finishes == [("error", task)] * (failure == "store hangs") + [("length", None)]


async def test_a_request_pushed_out_of_the_queue_leaves_once_with_queue_full(
    make_engine: Any, store: Any
) -> None:
    observer = FinishCounter()
    async with make_engine(store, observer=observer, max_batch_size=1, max_waiting=2) as engine:
        left = record_departures(engine)
        slow_steps(engine)
        running = await engine.add_request(GenerationRequest("run", PROMPT, greedy(400, ignore_eos=True)))
        await anext(running)  # the only row is taken: the others wait
        first = await engine.add_request(GenerationRequest("a1", PROMPT, greedy(2), tenant="a"))
        pushed = await engine.add_request(GenerationRequest("a2", PROMPT, greedy(2), tenant="a"))
        other = await engine.add_request(GenerationRequest("b1", PROMPT, greedy(2), tenant="b"))
        with pytest.raises(QueueFull, match="over its share"):
            await asyncio.wait_for(anext(pushed), timeout=5)
        assert [e async for e in pushed] == []  # ended once: nothing after the error
        running.abort()
        for handle in (first, other):
            assert [e.finish_reason for e in [e async for e in handle]] == [None, "length"]
        await wait_until(lambda: len(left) == 4)
    assert [row for row in left if row.request_id == "a2"] == [RowLeft("a2", "pushed_out", False)]
    assert observer.finishes.count(("error", None)) == 1  # counted once


def record_departures(engine: Any) -> list[RowLeft]:
    """Every departure the real scheduler reports in its plans' `left`, in order."""
    left: list[RowLeft] = []
    real_schedule = engine.scheduler.schedule

    def schedule() -> Any:
        plan = real_schedule()
        left.extend(plan.left)
        return plan

    engine.scheduler.schedule = schedule
    return left


async def test_a_queue_timeout_comes_on_time_while_requests_wait_for_their_prefix(
    make_engine: Any, store: Any
) -> None:
    timeout = 1.0
    async with make_engine(store, queue_timeout_s=timeout) as engine:
        store.gate = asyncio.Event()  # never set: "stuck"'s prefix never arrives
        started = time.monotonic()
        stuck = await engine.add_request(GenerationRequest("stuck", PROMPT, greedy(2), task="task-10"))
        await asyncio.sleep(0.4)
        # another request wakes the engine mid-wait (the old half-timeout wake-ups then came 0.4 s late)
        await collect(engine, GenerationRequest("other", PROMPT, greedy(2)))
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(anext(stuck), timeout=5)
        waited = time.monotonic() - started
    assert timeout <= waited < timeout + 0.25

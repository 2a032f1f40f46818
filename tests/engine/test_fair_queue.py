"""The waiting-queue policy with hand-made requests: no model, no clock, no server."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from server.engine.errors import QueueFull
from server.engine.fair_queue import FairQueue, FairQueueConfig, FcfsQueue
from server.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, StepOutput
from tests.engine.conftest import SCHEDULER_LIMITS

_ids = itertools.count()


@dataclass
class R:
    request_id: str
    tenant: str
    priority: str = "interactive"
    cost: int = 10


def r(tenant: str, priority: str = "interactive", cost: int = 10) -> R:
    return R(f"{tenant}-{priority[0]}{next(_ids)}", tenant, priority, cost)


def drain(q: FairQueue[R], n: int) -> list[R]:
    return [q.pop_next() for _ in range(n)]


def test_fcfs_within_a_tenants_class() -> None:
    q: FairQueue[R] = FairQueue(100)
    reqs = [r("a") for _ in range(5)]
    for x in reqs:
        q.push(x)
    assert drain(q, 5) == reqs


def test_equal_weights_alternate_between_backlogged_tenants() -> None:
    q: FairQueue[R] = FairQueue(100)
    for _ in range(10):
        q.push(r("a"))
    for _ in range(10):
        q.push(r("b"))
    order = [x.tenant for x in drain(q, 20)]
    # A queued all ten first, yet B is admitted every other time.
    assert order == ["a", "b"] * 10


def test_weights_three_to_one_give_three_quarters_of_the_cost() -> None:
    q: FairQueue[R] = FairQueue(1000, FairQueueConfig(tenant_weights={"a": 3.0, "b": 1.0}))
    for _ in range(200):
        q.push(r("a"))
        q.push(r("b"))
    first = Counter(x.tenant for x in drain(q, 100))
    assert first == {"a": 75, "b": 25}


def test_shares_count_cost_not_requests() -> None:
    q: FairQueue[R] = FairQueue(100)
    for _ in range(20):
        q.push(r("long", cost=40))
        q.push(r("short", cost=10))
    admitted = drain(q, 25)
    cost = Counter()
    for x in admitted:
        cost[x.tenant] += x.cost
    assert abs(cost["long"] - cost["short"]) <= 40  # equal cost, within one request


def test_a_tenant_back_from_idle_goes_next_but_banks_no_credit() -> None:
    q: FairQueue[R] = FairQueue(1000)
    for _ in range(300):
        q.push(r("flood"))
    drain(q, 100)  # B was idle all this time
    b1 = r("b")
    q.push(b1)
    assert q.pop_next() is b1  # ahead of the 200 waiting flood requests
    for _ in range(10):
        q.push(r("b"))
    # B's idle time bought it nothing: from now on the two alternate.
    order = [x.tenant for x in drain(q, 6)]
    assert Counter(order) == {"flood": 3, "b": 3} and order[0] != order[1]


def test_interactive_goes_first_but_batch_is_never_starved() -> None:
    q: FairQueue[R] = FairQueue(1000)
    batch = [r("a", "batch") for _ in range(5)]
    for x in batch:
        q.push(x)
    for _ in range(100):
        q.push(r("a", "interactive"))
    order = [x.priority for x in drain(q, 50)]
    assert order[0] == "interactive"
    assert order.count("batch") == 5  # all batch requests got in within 50 admissions
    assert order.count("interactive") == 45
    # Within the class: FCFS.
    q2: FairQueue[R] = FairQueue(1000)
    for x in batch:
        q2.push(x)
    assert drain(q2, 5) == batch


def test_classes_do_not_buy_a_tenant_more_than_its_share() -> None:
    q: FairQueue[R] = FairQueue(1000)
    for _ in range(50):
        q.push(r("greedy", "interactive"))
        q.push(r("honest", "batch"))
    assert Counter(x.tenant for x in drain(q, 40)) == {"greedy": 20, "honest": 20}


@pytest.mark.parametrize("seed", range(5))
def test_every_tenant_and_class_is_served_within_a_bound(seed: int) -> None:
    """Random arrivals, weights 1-8, costs 1-100: each waiting request is admitted, and each flow
    that waits is served again within a bounded number of admissions."""
    rng = random.Random(seed)
    tenants = {f"t{i}": float(rng.randint(1, 8)) for i in range(5)}
    q: FairQueue[R] = FairQueue(10_000, FairQueueConfig(tenant_weights=tenants))
    waiting_since: dict[tuple[str, str], int] = {}
    worst = 0
    for step in range(3000):
        for _ in range(rng.randint(0, 2)):
            x = r(rng.choice(list(tenants)), rng.choice(["interactive", "batch"]), rng.randint(1, 100))
            q.push(x)
            waiting_since.setdefault((x.tenant, x.priority), step)
        if len(q):
            got = q.pop_next()
            waiting_since.pop((got.tenant, got.priority), None)
            if any(p.tenant == got.tenant and p.priority == got.priority for p in q):
                waiting_since[(got.tenant, got.priority)] = step
        worst = max([worst] + [step - s for s in waiting_since.values()])
    while len(q):
        q.pop_next()
    # 5 tenants x 2 classes, weights up to 8:1 and costs up to 100:1 between flows.
    assert worst < 2000 and len(q) == 0


def test_per_tenant_bound_refuses_only_that_tenant() -> None:
    q: FairQueue[R] = FairQueue(100, FairQueueConfig(default_max_waiting=3))
    for _ in range(3):
        q.push(r("a"))
    with pytest.raises(QueueFull, match="tenant 'a'"):
        q.push(r("a"))
    q.push(r("b"))  # B is unaffected
    assert len(q) == 4


def test_full_queue_pushes_out_the_flooding_tenants_newest_lowest_class() -> None:
    q: FairQueue[R] = FairQueue(4)
    a_old = [r("a"), r("a", "batch"), r("a")]
    a_newest_interactive = r("a")
    for x in [*a_old, a_newest_interactive]:
        q.push(x)
    with pytest.raises(QueueFull):
        q.push(r("a"))  # A may not push out its own requests
    b = r("b")
    assert q.push(b) == [a_old[1]]  # A's batch request makes room, not its newer interactive one
    assert b.request_id in q and a_old[1].request_id not in q and len(q) == 4
    assert q.push(r("b")) == [a_newest_interactive]  # then A's newest; A (2 waiting) still has more than B
    with pytest.raises(QueueFull):
        q.push(r("b"))  # now B holds its share (2 of 4): no more room for it


def test_refund_of_an_early_finish_gives_the_tenant_its_share_back() -> None:
    q: FairQueue[R] = FairQueue(100)
    a1 = r("a", cost=100)
    q.push(a1)
    assert q.pop_next() is a1
    q.on_finished(a1, used=10)  # stopped at EOS after 10 of 100
    for _ in range(3):
        q.push(r("a", cost=10))
        q.push(r("b", cost=10))
    # A was charged 10, not 100: it is not pushed behind B for 90 tokens it never took.
    assert [x.tenant for x in drain(q, 2)] == ["b", "a"]


def test_fcfs_queue_is_arrival_order_with_a_global_bound() -> None:
    q: FcfsQueue[R] = FcfsQueue(3)
    reqs = [r("a"), r("b"), r("a")]
    for x in reqs:
        q.push(x)
    with pytest.raises(QueueFull):
        q.push(r("b"))
    assert [q.pop_next() for _ in range(3)] == reqs


def test_scheduler_admits_the_quiet_tenant_at_the_next_free_row() -> None:
    s = Scheduler(SchedulerConfig(**{**SCHEDULER_LIMITS, "max_running": 2}), clock=lambda: 2.0)

    def add(rid: str, tenant: str) -> None:
        s.add(ScheduledRequest(rid, 10, 30, arrival_time=1.0, tenant=tenant, cost=20))

    for i in range(20):
        add(f"a{i}", "a")
    assert s.schedule().prefill_ids == ["a0", "a1"]
    add("b0", "b")
    s.update([StepOutput("a0", finish_reason="length")])
    assert s.schedule().prefill_ids == ["b0"]  # not behind a2..a19


def test_would_refuse_agrees_with_push_and_changes_nothing() -> None:
    # The API answers 429 before reading a body when `would_refuse` says so: it must agree with push.
    import copy

    queues: list[FairQueue[R] | FcfsQueue[R]] = [
        FairQueue(3, FairQueueConfig(tenant_max_waiting={"c": 1})),
        FcfsQueue(3),
    ]
    for q in queues:
        for _ in range(3):
            q.push(r("a"))
        for tenant in ("a", "b"):
            before = list(q)
            predicted = q.would_refuse(tenant)
            assert list(q) == before
            trial = copy.deepcopy(q)
            try:
                trial.push(r(tenant))
                refused = False
            except QueueFull:
                refused = True
            assert predicted == refused, (type(q).__name__, tenant)
    fair = queues[0]
    assert fair.would_refuse("a") and not fair.would_refuse("b")  # b pushes out a's newest request


def test_a_request_that_cannot_run_yet_keeps_its_tenants_place() -> None:
    # "a" is next by the policy but its prefix still loads; "b" goes meanwhile, and once
    # "a" can run it goes before "b"'s next request (a's virtual time did not move while it waited).
    q: FairQueue[R] = FairQueue(100)
    a0, b0, b1, a1 = r("a"), r("b"), r("b"), r("a")
    for x in (a0, b0, b1, a1):
        q.push(x)
    loading = {a0.request_id, a1.request_id}

    def can_run(x: R) -> bool:
        return x.request_id not in loading

    assert q.peek() is a0 and q.peek(can_run) is b0
    q.pop(b0)
    loading.clear()
    assert [q.pop(q.peek(can_run) or b1) for _ in range(3)] == [a0, a1, b1]


@pytest.mark.parametrize("fair", [True, False])
def test_within_a_class_a_resident_request_passes_one_still_loading(fair: bool) -> None:
    q: FairQueue[R] | FcfsQueue[R] = FairQueue(100) if fair else FcfsQueue(100)
    first, second = r("a"), r("a")
    q.push(first)
    q.push(second)
    assert q.peek(lambda x: x is not first) is second
    assert q.peek(lambda x: False) is None

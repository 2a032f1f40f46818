"""The waiting-queue policy: which waiting request the scheduler admits next, and who gets a 429.

Pure bookkeeping over ids, tenants and costs (no tensors, no clock): the scheduler asks `peek()` for
the next request, checks its own limits (rows, prefill tokens, KV budget) and calls `pop(item)`.

`peek(eligible)` skips requests that cannot run yet (their prefix is still being loaded to
the device): the policy's order is kept among the others, and a skipped request keeps its place: its
tenant's and class's virtual times do not move, so it goes first as soon as it is eligible. Within a
tenant's class an eligible request may thus pass an earlier one that is still loading; nothing
passes a request whose prefix is resident.

`FairQueue` (the default) is weighted fair queuing in two levels, by stride scheduling:
- across tenants: each tenant has a virtual time `pass_`; the backlogged tenant with the smallest
  one is served next, and admitting a request advances its tenant's time by `cost / weight`. So
  over any busy period each backlogged tenant is admitted `weight`-proportional cost. A tenant that
  comes back from idle starts at the current virtual time (`max(own, vclock)`): it cannot bank
  credit while idle, and it is not behind a busy tenant's backlog either (its first request goes
  next). The cost of a request is what it can take of the batch: its decode steps (max_new_tokens);
  the unused part is refunded when it finishes early (`on_finished`).
- within a tenant, the same over its priority classes (`interactive` weighs `CLASS_WEIGHTS`
  more than `batch`), so interactive requests go first most of the time but batch is never
  starved. A class is a split of its tenant's share: marking everything interactive gains a tenant
  nothing against other tenants.
- within a tenant's class: first come, first served.
Every backlogged flow's virtual time is finite and the others' grow with every admission, so every
tenant and class is eventually the minimum: starvation-free.

Bounds (checked by `push`, raising `QueueFull`): a tenant's own bound (`tenant_max_waiting`, 0 =
none), then the global `max_waiting`. When the global queue is full, a request of a tenant holding
less than its weighted share of the queue pushes out the newest lowest-class request of the tenant
most over its share (returned by `push`; the engine answers it 429 as if it had arrived to a full
queue). So one tenant filling the queue never turns another tenant's request into a 429.

`FcfsQueue` is the policy with fairness off: one FCFS line, the global bound only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from server.engine.errors import QueueFull
from server.limits import DEFAULT_LIMITS

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # highest first
CLASS_WEIGHTS: Mapping[str, float] = {"interactive": 4.0, "batch": 1.0}
_RANK: dict[str, int] = {name: i for i, name in enumerate(PRIORITIES)}


class Queued(Protocol):
    """What the policy reads of a waiting request."""

    @property
    def request_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def priority(self) -> str: ...
    @property
    def cost(self) -> int: ...


T = TypeVar("T", bound=Queued)
Eligible = Callable[[T], bool]  # may this waiting request be admitted now?


@dataclass(frozen=True)
class FairQueueConfig:
    """Fairness settings. `enabled=False`: FCFS (the policy before fairness, for comparisons)."""

    enabled: bool = True
    tenant_weights: Mapping[str, float] = field(default_factory=dict)  # missing: default_weight
    tenant_max_waiting: Mapping[str, int] = field(default_factory=dict)  # missing: default_max_waiting
    default_weight: float = 1.0
    default_max_waiting: int = DEFAULT_LIMITS.tenant_max_waiting  # per tenant; 0 = only the global bound

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, self.default_weight)

    def max_waiting(self, tenant: str) -> int:
        return self.tenant_max_waiting.get(tenant, self.default_max_waiting)


class _Flows(Generic[T]):
    """FCFS lines with stride virtual times: the line with the smallest `pass_` goes next."""

    def __init__(self) -> None:
        self.lines: dict[str, OrderedDict[str, T]] = {}
        self.pass_: dict[str, float] = {}
        self.vclock = 0.0  # virtual time of the last line served
        self.count = 0

    def add(self, name: str, item: T) -> None:
        line = self.lines.setdefault(name, OrderedDict())
        if not line:  # back from idle: no banked credit, no debt beyond the present
            self.pass_[name] = max(self.pass_.get(name, 0.0), self.vclock)
        line[item.request_id] = item
        self.count += 1

    def names_in_order(self) -> list[str]:
        """Backlogged lines, the one to serve first first. Ties go to the higher class, then the name
        that sorts first (deterministic)."""
        return [name for _, _, name in sorted(self._backlogged())]

    def next_name(self) -> str | None:
        """`names_in_order()[0]` without the sort."""
        backlogged = self._backlogged()
        return min(backlogged)[2] if backlogged else None

    def _backlogged(self) -> list[tuple[float, int, str]]:
        return [(self.pass_[n], _RANK.get(n, 0), n) for n, line in self.lines.items() if line]

    def charge(self, name: str, amount: float) -> None:
        self.vclock = self.pass_[name]
        self.pass_[name] += amount

    def refund(self, name: str, amount: float) -> None:
        if name in self.pass_:
            self.pass_[name] -= amount

    def remove(self, name: str, request_id: str) -> T | None:
        line = self.lines.get(name)
        item = None if line is None else line.pop(request_id, None)
        if item is not None:
            self.count -= 1
        return item


class FairQueue(Generic[T]):
    """Two-level weighted fair queue (tenants, then priority classes). See the module docstring."""

    def __init__(self, max_waiting: int, config: FairQueueConfig | None = None) -> None:
        self.max_waiting = max_waiting
        self.config = config or FairQueueConfig()
        self._tenants: _Flows[T] = _Flows()
        self._classes: dict[str, _Flows[T]] = {}  # per tenant
        self._by_id: dict[str, T] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._by_id.values()))  # arrival order

    def num_waiting(self, tenant: str) -> int:
        flows = self._classes.get(tenant)
        return 0 if flows is None else flows.count

    def push(self, item: T) -> list[T]:
        """Queue `item`; returns requests pushed out to make room. Raises `QueueFull` (see module doc)."""
        tenant = item.tenant
        refusal = self.refusal(tenant)
        if refusal is not None:
            raise QueueFull(refusal)
        displaced: list[T] = []
        if len(self) >= self.max_waiting:
            victim = self._push_out_victim(tenant)
            assert victim is not None  # else `refusal` said why
            self.remove(victim.request_id)
            displaced.append(victim)
        self._by_id[item.request_id] = item
        self._tenants.add(tenant, item)
        self._classes.setdefault(tenant, _Flows()).add(_class_of(item), item)
        return displaced

    def would_refuse(self, tenant: str) -> bool:
        """`push` of a request of `tenant` would raise `QueueFull` now (nothing is changed)."""
        return self.refusal(tenant) is not None

    def refusal(self, tenant: str) -> str | None:
        """Why `push` of a request of `tenant` would raise `QueueFull` now, naming the bound it meets
        (the tenant's own or the global one); None if it would not. Nothing is changed."""
        own, bound = self.num_waiting(tenant), self.config.max_waiting(tenant)
        if bound and own >= bound:
            return f"tenant {tenant!r} has {own} requests waiting, its own queue bound (tenant max_waiting); retry later"
        if len(self) >= self.max_waiting and self._push_out_victim(tenant) is None:
            return _global_refusal(len(self))
        return None

    def _push_out_victim(self, tenant: str) -> T | None:
        """The newest lowest-class request of the tenant most over its weighted share, if that
        tenant holds more per weight than `tenant` would after its request is queued."""
        weight = self.config.weight
        load = {t: flows.count / weight(t) for t, flows in self._classes.items() if flows.count}
        if not load:
            return None
        heaviest = max(load, key=lambda t: (load[t], t))
        if heaviest == tenant or load[heaviest] <= (self.num_waiting(tenant) + 1) / weight(tenant):
            return None
        lines = self._classes[heaviest].lines
        for priority in reversed(PRIORITIES):
            line = lines.get(priority)
            if line:
                return next(reversed(line.values()))
        return None

    def peek(self, eligible: Eligible[T] | None = None) -> T | None:
        """The request to admit next among the `eligible` ones (default: all), or None."""
        tenant = self._tenants.next_name()
        if tenant is None:
            return None
        classes = self._classes[tenant]
        name = classes.next_name()
        assert name is not None
        head = next(iter(classes.lines[name].values()))
        if eligible is None or eligible(head):
            return head  # the common case: the policy's own next request
        for tenant in self._tenants.names_in_order():
            classes = self._classes[tenant]
            for name in classes.names_in_order():
                for item in classes.lines[name].values():
                    if eligible is None or eligible(item):
                        return item
        return None

    def pop_next(self) -> T:
        """Admit `peek()`'s request (every request eligible)."""
        item = self.peek()
        assert item is not None, "pop_next on an empty queue"
        return self.pop(item)

    def pop(self, item: T) -> T:
        """Admit `item` (what `peek` returned): remove it and charge its tenant and class for its cost."""
        self.remove(item.request_id)
        cost = max(1, item.cost)
        self._tenants.charge(item.tenant, cost / self.config.weight(item.tenant))
        self._classes[item.tenant].charge(_class_of(item), cost / CLASS_WEIGHTS[_class_of(item)])
        return item

    def remove(self, request_id: str) -> T | None:
        """Take a waiting request out without charging (aborted, timed out, pushed out)."""
        item = self._by_id.pop(request_id, None)
        if item is not None:
            self._tenants.remove(item.tenant, request_id)
            self._classes[item.tenant].remove(_class_of(item), request_id)
        return item

    def on_finished(self, item: T, used: int) -> None:
        """Refund the part of an admitted request's cost it did not use (it stopped early)."""
        unused = max(1, item.cost) - max(1, used)
        if unused > 0:
            self._tenants.refund(item.tenant, unused / self.config.weight(item.tenant))
            flows = self._classes.get(item.tenant)
            if flows is not None:
                flows.refund(_class_of(item), unused / CLASS_WEIGHTS[_class_of(item)])


class FcfsQueue(Generic[T]):
    """First come, first served over one line; the global bound only (fairness off)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._line: OrderedDict[str, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._line)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._line

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._line.values()))

    def would_refuse(self, tenant: str) -> bool:
        return self.refusal(tenant) is not None

    def refusal(self, tenant: str) -> str | None:
        return _global_refusal(len(self._line)) if len(self._line) >= self.max_waiting else None

    def push(self, item: T) -> list[T]:
        refusal = self.refusal(item.tenant)
        if refusal is not None:
            raise QueueFull(refusal)
        self._line[item.request_id] = item
        return []

    def peek(self, eligible: Eligible[T] | None = None) -> T | None:
        return next((item for item in self._line.values() if eligible is None or eligible(item)), None)

    def pop_next(self) -> T:
        return self._line.popitem(last=False)[1]

    def pop(self, item: T) -> T:
        del self._line[item.request_id]
        return item

    def remove(self, request_id: str) -> T | None:
        return self._line.pop(request_id, None)

    def on_finished(self, item: T, used: int) -> None:
        pass


WaitingQueue = FairQueue[T] | FcfsQueue[T]  # the scheduler's view: both have the same methods


def make_waiting_queue(max_waiting: int, config: FairQueueConfig) -> WaitingQueue[T]:
    """The policy `config` asks for."""
    return FairQueue(max_waiting, config) if config.enabled else FcfsQueue(max_waiting)


def _class_of(item: Queued) -> str:
    return item.priority if item.priority in CLASS_WEIGHTS else "interactive"


def _global_refusal(num_waiting: int) -> str:
    return f"the server's queue is full: {num_waiting} requests are waiting (max_waiting); retry later"

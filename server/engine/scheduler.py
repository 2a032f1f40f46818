"""The scheduler: which requests run in the next step. Pure bookkeeping over ids and token counts.

vLLM v1 style: the engine loop is `plan = schedule()` -> run the model -> `update(outputs)`. No
tensors here, so tests drive it with hand-made outputs.

Admission (`schedule`) takes waiting requests in the order of the waiting-queue policy
(`fair_queue`: weighted fair across tenants and priority classes, FCFS within a tenant's class; or
plain FCFS when fairness is off) while all of these hold:
- running requests stay within `max_running` (rows of the batch);
- the prompt tokens computed in this step stay within `max_prefill_tokens`. With `chunked_prefill`
  (GPT-2) a prompt is split into chunks across steps: requests still prefilling get their next chunk
  first (admission order), then new requests take what is left, so a long prompt never stalls the
  decoding rows for more than one budget's worth of tokens per step. Without it (BART: the prompt
  is the encoder's input) the first request of a step is always admitted when the other limits
  allow, so a prompt longer than the per-step limit still runs (alone) instead of waiting forever;
- the KV budget: each running request reserves `reserved_tokens` (prefix + prompt + max_new_tokens)
  for its whole life, so a running request can never run out of cache mid-generation.
When the policy's next request does not fit, admission stops: a later, smaller request is never
admitted ahead of it (no starvation of long prompts).

Which waiting request is considered next is one call, `self._waiting.peek(ready)` (the queue
policy); the plan lists decoding rows (prompt fully computed) and prefill chunks `[start, end)`
separately. A request whose prefix is not resident on the device yet (`prefix_ready`
False; the engine prefetches it and calls `mark_ready`) is not admitted: it keeps its place in the
policy's order while requests whose prefix is resident go ahead, so a load never stalls a step.

Leaving: every request that leaves the scheduler is reported exactly once in the next plan's `left`
with the reason (finished: "stop" / "length" / "eos" from `update`; "aborted" / "failed" from
`abort`; "timed_out" for waiting requests older than `queue_timeout_s`; "pushed_out" for waiting
requests the fair queue pushed out to make room in `add`), and whether it held a row (`was_running`). That list is the one place the engine learns whose rows to free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from server.engine.errors import InvalidRequest
from server.engine.fair_queue import FairQueueConfig, WaitingQueue, make_waiting_queue

# Why a request left: finished ("stop" sequence, "length" limit, "eos" token), or ended otherwise.
LeaveReason = Literal["stop", "length", "eos", "aborted", "failed", "timed_out", "pushed_out"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler; see the module docstring. No defaults: the engine fills it from `Limits`."""

    max_running: int
    max_prefill_tokens: int
    kv_budget_tokens: int
    max_waiting: int
    queue_timeout_s: float
    fair_queue: FairQueueConfig = field(default_factory=FairQueueConfig)  # waiting-queue policy
    chunked_prefill: bool = False  # split prompts into chunks under max_prefill_tokens


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, end) of a request to compute in this step."""

    request_id: str
    start: int
    end: int


class Schedulable(Protocol):
    """What the scheduler reads of a request (the engine's `request.Request`; `ScheduledRequest` here)."""

    reserved_tokens: int
    num_computed_tokens: int
    prefix_ready: bool

    @property
    def request_id(self) -> str: ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def arrival_time(self) -> float: ...

    @property
    def num_generated_tokens(self) -> int: ...

    @property
    def tenant(self) -> str: ...

    @property
    def priority(self) -> str: ...

    @property
    def cost(self) -> int: ...

    @property
    def prefilling(self) -> bool: ...


@dataclass
class ScheduledRequest:
    """A request reduced to what the scheduler reads: ids and counts only (tests, tools)."""

    request_id: str
    num_prompt_tokens: int
    reserved_tokens: int  # prefix + prompt + max_new_tokens: KV positions held while running
    arrival_time: float = 0.0
    num_generated_tokens: int = 0
    # Who waits in which fair-queue line, and how much of its tenant's share it takes.
    tenant: str = "default"
    priority: str = "interactive"
    cost: int = 1  # decode steps it may take (max_new_tokens)
    num_computed_tokens: int = 0  # prompt tokens scheduled for computation so far (chunked)
    prefix_ready: bool = True  # its prefix is on the device (False while it is prefetched)

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass(frozen=True)
class RowLeft:
    """A request that left since the last plan, and why."""

    request_id: str
    reason: LeaveReason
    was_running: bool  # it held a batch row (the engine frees it); False: it left the waiting queue


@dataclass
class SchedulerPlan:
    """One step: rows to decode (prompt computed), prompt chunks to compute, and who left.

    `prefill_ids` are the requests admitted in this step (their first chunk is in `prefill_chunks`).
    """

    prefill_ids: list[str] = field(default_factory=list)
    decode_ids: list[str] = field(default_factory=list)
    prefill_chunks: list[PrefillChunk] = field(default_factory=list)
    left: list[RowLeft] = field(default_factory=list)

    @property
    def released_ids(self) -> list[str]:
        """Requests whose batch rows must be freed before this step runs."""
        return [row.request_id for row in self.left if row.was_running]


@dataclass(frozen=True)
class StepOutput:
    """A request's result of one step: whether it finished, and why (its tokens are on its record)."""

    request_id: str
    finish_reason: LeaveReason | None = None


class Scheduler:
    """FCFS continuous-batching scheduler over request ids (not thread-safe: one owner, the engine loop)."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._waiting: WaitingQueue[Schedulable] = make_waiting_queue(config.max_waiting, config.fair_queue)
        self._running: dict[str, Schedulable] = {}  # insertion order = admission order
        self._left: list[RowLeft] = []  # reported by the next `schedule`
        self.reserved_tokens = 0  # sum over running requests

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def waiting_ids(self) -> list[str]:
        return [req.request_id for req in self._waiting]

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    @property
    def kv_usage_ratio(self) -> float:
        return self.reserved_tokens / self.config.kv_budget_tokens

    def refusal(self, tenant: str) -> str | None:
        """Why `add` of a request of `tenant` would raise `QueueFull` now, naming the bound (the tenant's
        own or the global one); None if it would not (the queue policy decides)."""
        self._bound_waiting()
        return self._waiting.refusal(tenant)

    def _bound_waiting(self) -> None:
        """`max_waiting` bounds the requests that wait beyond the batch's free rows: a request added
        while a step runs (the rows free, but not yet filled) takes a row at the next `schedule`, so it
        does not count against the queue. Without this a burst admitted by the API for those rows was
        refused after its body was parsed and tokenised, the expensive way."""
        free_rows = max(0, self.config.max_running - len(self._running))
        self._waiting.max_waiting = self.config.max_waiting + free_rows

    def next_deadline(self) -> float | None:
        """The clock time at which the oldest waiting request times out (None: nobody waits)."""
        oldest = min((req.arrival_time for req in self._waiting), default=None)
        return None if oldest is None else oldest + self.config.queue_timeout_s

    def has_work(self) -> bool:
        """Something to run or to report: a waiting request that could be admitted, a running one,
        or a departure (a waiting queue of requests whose prefixes still load is no work)."""
        return bool(self._running or self._left or self._waiting.peek(_ready) is not None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting or request_id in self._running

    # ---- changes -------------------------------------------------------------------------------
    def add(self, request: Schedulable) -> None:
        """Queue a request. Raises `QueueFull` when its tenant's or the global queue is full,
        `InvalidRequest` if it can never fit. Waiting requests the policy pushes out to make room
        leave with reason "pushed_out" (the caller answers them as if they had met a full queue)."""
        if request.request_id in self:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        self._check_fits(request.reserved_tokens)
        if not request.arrival_time:  # a `ScheduledRequest` made without one: now
            request.arrival_time = self._clock()  # type: ignore[misc]
        self._bound_waiting()
        for old in self._waiting.push(request):
            self._left.append(RowLeft(old.request_id, "pushed_out", was_running=False))

    def _check_fits(self, reserved_tokens: int) -> None:
        if reserved_tokens > self.config.kv_budget_tokens:
            raise InvalidRequest(
                f"request needs {reserved_tokens} KV positions (prefix + prompt + max_new_tokens), "
                f"more than the whole KV budget of {self.config.kv_budget_tokens}"
            )

    def reserve(self, request_id: str, reserved_tokens: int) -> None:
        """A waiting request's KV reservation, once its prefix is known (the engine queues it before).
        Raises `InvalidRequest` if it can never fit."""
        self._check_fits(reserved_tokens)
        for req in self._waiting:
            if req.request_id == request_id:
                req.reserved_tokens = reserved_tokens

    def mark_ready(self, request_id: str) -> None:
        """The waiting request's prefix is now on the device: it may be admitted."""
        for req in self._waiting:
            if req.request_id == request_id:
                req.prefix_ready = True

    def abort(self, request_id: str, reason: LeaveReason = "aborted") -> bool:
        """Remove a request (reported in the next plan's `left` with `reason`). False if unknown."""
        if self._waiting.remove(request_id) is not None:
            self._left.append(RowLeft(request_id, reason, was_running=False))
            return True
        req = self._running.pop(request_id, None)
        if req is None:
            return False
        self._leave(req, reason)
        return True

    def _leave(self, req: Schedulable, reason: LeaveReason) -> None:
        """A running request leaves: its KV reservation is returned and its unused cost refunded."""
        self.reserved_tokens -= req.reserved_tokens
        self._waiting.on_finished(req, req.num_generated_tokens)
        self._left.append(RowLeft(req.request_id, reason, was_running=True))

    def schedule(self) -> SchedulerPlan:
        """Plan the next step: expire old waiting requests, then admit in policy order within the limits."""
        decoding = [rid for rid, req in self._running.items() if not req.prefilling]
        now = self._clock()
        for old in self._waiting:
            if now - old.arrival_time > self.config.queue_timeout_s:
                self.abort(old.request_id, "timed_out")
        plan = SchedulerPlan(decode_ids=decoding, left=self._left)
        self._left = []
        budget = self.config.max_prefill_tokens
        for running in self._running.values():  # chunks of prompts already started come first
            if running.prefilling and budget > 0:
                budget -= self._chunk(plan, running, budget)
        while (head := self._waiting.peek(_ready)) is not None:  # the queue policy's next request
            req, rid = head, head.request_id
            if len(self._running) >= self.config.max_running:
                break
            if self.reserved_tokens + req.reserved_tokens > self.config.kv_budget_tokens:
                break
            if self.config.chunked_prefill:
                if budget <= 0:
                    break
            elif plan.prefill_chunks and req.num_prompt_tokens > budget:
                break
            self._waiting.pop(req)
            self._running[rid] = req
            self.reserved_tokens += req.reserved_tokens
            plan.prefill_ids.append(rid)
            budget -= self._chunk(plan, req, budget)
        return plan

    def _chunk(self, plan: SchedulerPlan, req: Schedulable, budget: int) -> int:
        """Schedule the request's next prompt chunk within `budget` (whole prompt without chunking)."""
        start = req.num_computed_tokens
        remaining = req.num_prompt_tokens - start
        size = min(remaining, budget) if self.config.chunked_prefill else remaining
        req.num_computed_tokens = start + size
        plan.prefill_chunks.append(PrefillChunk(req.request_id, start, start + size))
        return size

    def update(self, outputs: Iterable[StepOutput]) -> list[str]:
        """Record a step's results; finished requests leave the running set (reported in the next
        plan's `left`). Returns their ids."""
        finished = []
        for out in outputs:
            req = self._running.get(out.request_id)
            if req is None:  # aborted while the step ran
                continue
            if out.finish_reason is not None:
                del self._running[out.request_id]
                self._leave(req, out.finish_reason)
                finished.append(out.request_id)
        return finished


def _ready(req: Schedulable) -> bool:
    return req.prefix_ready

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

Which waiting request is considered next is one call, `self._waiting.peek()` (the queue policy); the
plan lists decoding rows (prompt fully computed) and prefill chunks `[start, end)` separately.

Waiting requests older than `queue_timeout_s` are dropped and reported in `timed_out_ids`. Aborted
running requests are reported once in `aborted_ids` so the engine frees their rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.engine.errors import InvalidRequest
from server.engine.fair_queue import FairQueueConfig, WaitingQueue, make_waiting_queue


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler; see the module docstring. No defaults: the engine fills it from `Limits`."""

    max_running: int
    max_prefill_tokens: int
    kv_budget_tokens: int
    max_waiting: int
    queue_timeout_s: float
    fair_queue: FairQueueConfig = field(default_factory=FairQueueConfig)  # issue 18: waiting-queue policy
    chunked_prefill: bool = False  # issue 15: split prompts into chunks under max_prefill_tokens


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, end) of a request to compute in this step."""

    request_id: str
    start: int
    end: int


@dataclass
class ScheduledRequest:
    """What the scheduler knows about a request: ids and counts only."""

    request_id: str
    num_prompt_tokens: int
    reserved_tokens: int  # prefix + prompt + max_new_tokens: KV positions held while running
    arrival_time: float = 0.0
    num_generated_tokens: int = 0
    # Issue 18: who waits in which fair-queue line, and how much of its tenant's share it takes.
    tenant: str = "default"
    priority: str = "interactive"
    cost: int = 1  # decode steps it may take (max_new_tokens)
    num_computed_tokens: int = 0  # issue 15: prompt tokens scheduled for computation so far (chunked)

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass
class SchedulerPlan:
    """One step: rows to decode (prompt computed), prompt chunks to compute, and what left the batch.

    `prefill_ids` are the requests admitted in this step (their first chunk is in `prefill_chunks`).
    """

    prefill_ids: list[str] = field(default_factory=list)
    decode_ids: list[str] = field(default_factory=list)
    prefill_chunks: list[PrefillChunk] = field(default_factory=list)
    timed_out_ids: list[str] = field(default_factory=list)
    aborted_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """A request's result of one step: how many tokens it produced and whether it is done."""

    request_id: str
    num_new_tokens: int = 1
    finished: bool = False


class Scheduler:
    """FCFS continuous-batching scheduler over request ids (not thread-safe: one owner, the engine loop)."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._waiting: WaitingQueue[ScheduledRequest] = make_waiting_queue(
            config.max_waiting, config.fair_queue
        )
        self._running: dict[str, ScheduledRequest] = {}  # insertion order = admission order
        self._pending_aborts: list[str] = []
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

    def would_refuse(self, tenant: str) -> bool:
        """`add` of a request of `tenant` would raise `QueueFull` now (the queue policy decides)."""
        return self._waiting.would_refuse(tenant)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._pending_aborts)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting or request_id in self._running

    # ---- changes -------------------------------------------------------------------------------
    def add(self, request: ScheduledRequest) -> list[str]:
        """Queue a request. Raises `QueueFull` when its tenant's or the global queue is full,
        `InvalidRequest` if it can never fit. Returns the ids of waiting requests the policy pushed
        out to make room (the caller answers them as if they had met a full queue)."""
        if request.request_id in self:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        if request.reserved_tokens > self.config.kv_budget_tokens:
            raise InvalidRequest(
                f"request needs {request.reserved_tokens} KV positions (prefix + prompt + max_new_tokens), "
                f"more than the whole KV budget of {self.config.kv_budget_tokens}"
            )
        if not request.arrival_time:
            request.arrival_time = self._clock()
        return [req.request_id for req in self._waiting.push(request)]

    def abort(self, request_id: str) -> bool:
        """Remove a request. A running one is reported in the next plan's `aborted_ids`. False if unknown."""
        if self._waiting.remove(request_id) is not None:
            return True
        req = self._running.pop(request_id, None)
        if req is None:
            return False
        self.reserved_tokens -= req.reserved_tokens
        self._waiting.on_finished(req, req.num_generated_tokens)
        self._pending_aborts.append(request_id)
        return True

    def schedule(self) -> SchedulerPlan:
        """Plan the next step: expire old waiting requests, then admit in policy order within the limits."""
        decoding = [rid for rid, req in self._running.items() if not req.prefilling]
        plan = SchedulerPlan(decode_ids=decoding, aborted_ids=self._pending_aborts)
        self._pending_aborts = []
        now = self._clock()
        for old in self._waiting:
            if now - old.arrival_time > self.config.queue_timeout_s:
                self._waiting.remove(old.request_id)
                plan.timed_out_ids.append(old.request_id)
        budget = self.config.max_prefill_tokens
        for running in self._running.values():  # chunks of prompts already started come first
            if running.prefilling and budget > 0:
                budget -= self._chunk(plan, running, budget)
        while (head := self._waiting.peek()) is not None:  # the queue policy's next request
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
            self._waiting.pop_next()
            self._running[rid] = req
            self.reserved_tokens += req.reserved_tokens
            plan.prefill_ids.append(rid)
            budget -= self._chunk(plan, req, budget)
        return plan

    def _chunk(self, plan: SchedulerPlan, req: ScheduledRequest, budget: int) -> int:
        """Schedule the request's next prompt chunk within `budget` (whole prompt without chunking)."""
        start = req.num_computed_tokens
        remaining = req.num_prompt_tokens - start
        size = min(remaining, budget) if self.config.chunked_prefill else remaining
        req.num_computed_tokens = start + size
        plan.prefill_chunks.append(PrefillChunk(req.request_id, start, start + size))
        return size

    def update(self, outputs: Iterable[StepOutput]) -> list[str]:
        """Record a step's results; finished requests leave the running set. Returns their ids."""
        finished = []
        for out in outputs:
            req = self._running.get(out.request_id)
            if req is None:  # aborted while the step ran
                continue
            req.num_generated_tokens += out.num_new_tokens
            if out.finished:
                del self._running[out.request_id]
                self.reserved_tokens -= req.reserved_tokens
                self._waiting.on_finished(req, req.num_generated_tokens)
                finished.append(out.request_id)
        return finished

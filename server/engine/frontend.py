"""The engine front end: one request path above every model backend.

`EngineFrontEnd` is the engine the API, the load test and the tests use (docs/architecture.md). It owns
what is the same whoever runs the model: admission (validation, the prompt tokenised once, the task's
name), the `Scheduler` and its fair queue, the prefix cache's host tier and store reads (traffic
splits included), each request's record (`request.Request`), the detokenizer and stop conditions (the
one place a request's end is decided), its events, and the metrics. A `backend.ModelBackend` runs the
model: ours (`native_backend.NativeBackend`, continuous batching over our runners) or vLLM's
(`server.vllm_backend.backend.VllmBackend`).

The contract: `add_request(request)` raises every admission error that needs no store read itself and
returns a `RequestHandle` whose events stream (`async for event in handle`) and which `abort()`s the
request; `generate()` is a thin wrapper. While a request for a task waits in the queue, its own task
(`_load_prefix`) locates its prefix (a store read and validation on a miss: unknown tasks, a store that
is down and prefixes that do not fit fail here, on the handle), checks it fits with it, and has the
backend place it; only then may the scheduler admit it. So neither a store read nor a copy ever stalls
a step or another request, and the queue timeout covers the whole wait.

One loop: `plan = scheduler.schedule()` -> `await backend.step(plan)` -> `_apply`. Every request that
leaves (finished, aborted, failed, timed out) is reported once in the next plan's `left`; the backend
is told at once (`release`). Failure isolation: an error the model raises for one request fails it
alone (`RequestFailed`); one that breaks the step itself, or the backend dying, marks the engine
unhealthy (`healthy` False, `failure` set) and every pending request gets `EngineStopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from modeling.models import LoadedModel
from prefix_store.base import InvalidName, PrefixStore, validate_name
from server.engine.backend import EngineDead, ModelBackend, StepResult, TokenOutput
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import (
    EngineStopped,
    InvalidRequest,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    UnknownTask,
)
from server.engine.fair_queue import FairQueueConfig
from server.engine.grammar import CompiledConstraint, GrammarCompiler
from server.engine.handle import RequestHandle
from server.engine.interface import ServingEngine
from server.engine.observer import EngineObserver
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats
from server.engine.request import Request, failure_note, tokenize_prompt
from server.engine.sampling import new_seed
from server.engine.scheduler import LeaveReason, RowLeft, Scheduler, StepOutput
from server.engine.task_uses import TaskUses
from server.engine.types import FinishReason, GenerationRequest, StreamEvent
from server.limits import Limits

logger = logging.getLogger(__name__)

# The loop wakes this long after the earliest queue deadline (a timeout is "waited more than").
_DEADLINE_SLACK_S = 0.001

# How the detokenizer's finish reasons read in the scheduler's departures.
_LEAVE_REASONS: dict[FinishReason, LeaveReason] = {
    "length": "length",
    "eos_token": "eos",
    "stop_sequence": "stop",
}


@dataclass
class EngineConfig:
    """The front end's configuration: the one `Limits` object (built from the settings) and the fair
    queue's tenant weights and bounds. What tunes one backend is that backend's own options."""

    limits: Limits = field(default_factory=Limits)
    fair_queue: FairQueueConfig = field(default_factory=FairQueueConfig)


class EngineFrontEnd:
    """See the module docstring. Event loop only."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: PrefixStore | None,
        model: ModelBackend,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        prefix_device: torch.device | None = None,
        prefix_device_bytes: int | None = None,
    ) -> None:
        """`prefix_device` and `prefix_device_bytes`: the prefix cache's device tier (default: the
        model's device, `limits.device_prefix_cache_bytes`); a backend that keeps prefixes where the
        model reads them itself (vLLM: its table) passes the host and 0."""
        self.loaded = loaded
        self.model = model
        self.backend = model.name
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.tokenizer = loaded.tokenizer
        limits = self.config.limits
        self.scheduler = Scheduler(model.scheduler_config(limits, self.config.fair_queue))
        self.prefix_cache: PrefixCache | None = None
        if store is not None:
            tier_limits = limits
            if prefix_device_bytes is not None:
                tier_limits = dataclasses.replace(limits, device_prefix_cache_bytes=prefix_device_bytes)
            device = loaded.device if prefix_device is None else prefix_device
            self.prefix_cache = PrefixCache(
                store, loaded.spec, device, loaded.dtype, tier_limits, listener=self.observer
            )
        self._uses = TaskUses(self.prefix_cache) if self.prefix_cache is not None else None
        # Structured output: constraints compiled (bounded, cached) once for either backend; ours masks
        # its rows' tokens with them, vLLM gets the grammar and applies its own bitmask.
        self.grammars = GrammarCompiler(
            loaded.tokenizer,
            model.vocab_size,
            model.eos_token_id,
            limits,
            self.observer,
            token_masks=model.name == "native",
        )
        self.healthy = True
        self.failure: BaseException | None = None
        self._requests: dict[str, Request] = {}
        self._prefix_loads: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._accepting = False
        self._loop_task: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backend (vLLM: its engine core; tens of seconds) and the loop."""
        if self._loop_task is not None:
            return
        await self.model.start(self.observer, lambda: len(self.running_tasks))
        if self.prefix_cache is not None:
            self.prefix_cache.start()
        self._wake = asyncio.Event()
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name=f"prefixserve-{self.backend}-loop")
        if self._uses is not None:
            self._uses.start()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `drain_timeout_s`, then
        end the rest with finish_reason "cancelled", and stop the backend."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._requests and self.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for state in list(self._requests.values()):
            self._finish_outside(state, "cancelled")
        for load in list(self._prefix_loads):
            load.cancel()
        if self._uses is not None:
            await self._uses.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
            self._loop_task = None
        await self.grammars.close()
        await self.model.stop()

    # ---- gauges -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def queue_refusal(self, tenant: str) -> str | None:
        """Why a request of `tenant` would get `QueueFull` now (its tenant's bound or the global one),
        None if it would not: the API answers 429 with it before reading the body."""
        return self.scheduler.refusal(tenant)

    @property
    def running_tasks(self) -> list[str]:
        """Distinct "tenant/task" of running requests (bare-model requests not listed)."""
        return self._task_labels(self.scheduler.running_ids)

    @property
    def waiting_tasks(self) -> list[str]:
        return self._task_labels(self.scheduler.waiting_ids)

    @property
    def kv_usage_ratio(self) -> float:
        usage = self.model.kv_usage_ratio()
        return self.scheduler.kv_usage_ratio if usage is None else usage

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """The backend's KV memory (our GPT-2: `used_bytes`, `peak_bytes`, `prefix_bytes`, ...)."""
        return self.model.kv_stats(reset_peaks)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats

    def prefix_cache_bytes(self, tier: str) -> int:
        """Bytes of prefixes in a tier: "device" is where the model reads them (vLLM: its table)."""
        if tier == "device":
            held = self.model.device_prefix_bytes()
            if held is not None:
                return held
        return 0 if self.prefix_cache is None else self.prefix_cache.stats.bytes.get(tier, 0)

    # ---- device residency and warm start (what routers and a restarted replica use) -------------
    @property
    def resident_prefixes(self) -> list[tuple[str, str]]:
        """(tenant, task) pairs whose prefix the model can read now, without a load."""
        held = self.model.resident_prefixes()
        if held is not None:
            return held
        return [] if self.prefix_cache is None else self.prefix_cache.resident_tasks()

    @property
    def resident_prefix_capacity(self) -> int:
        """How many prefixes of `max_prefix_length` positions (every prefix kind the model has) the
        model's tier holds; shorter ones fit more, so this is a floor, never below what is resident."""
        if self.prefix_cache is None:
            return 0
        length = self.config.limits.max_prefix_length
        capacity = self.model.resident_prefix_capacity(length)
        if capacity is None:
            capacity = self.prefix_cache.budget_bytes("device") // max(1, _prefix_bytes(self.loaded, length))
        return max(capacity, len(self.resident_prefixes))

    async def warm(self, tenant: str, task: str) -> bool:
        """Load the task's prefix (the version a request would get) into the host tier, and where the
        model reads it if that evicts nothing, without a request. False (never raises) if it could
        not: no store, unknown task, store down, blob invalid, engine failed."""
        if self.prefix_cache is None or not self.healthy:
            return False
        try:
            validate_name(tenant, "tenant")
            validate_name(task, "task")
            found = await self.prefix_cache.warm(tenant, task)
            return await self.model.warm((tenant, task, found.version), found)
        except Exception as exc:  # a warm start is best effort: the first request reads it again
            logger.info("warming %s/%s failed: %s", tenant, task, type(exc).__name__)
            return False

    def _task_labels(self, ids: list[str]) -> list[str]:
        labels = {self._requests[r].task_label for r in ids if r in self._requests}
        return sorted(label for label in labels if label)

    # ---- requests -----------------------------------------------------------------------------
    async def add_request(self, request: GenerationRequest) -> RequestHandle:
        """Admit a request and return its handle (see `handle`).

        Raises what needs no store read here, before any event: `InvalidRequest` (`InvalidConstraint`
        for a structured-output constraint that does not compile), `PromptTooLong`, `QueueFull`,
        `EngineStopped` (and `UnknownTask` on an engine without a store). What needs the
        task's prefix is checked while the request waits and raised by the handle's first iteration,
        before any event: `UnknownTask`, `StoreUnavailable`, `InvalidPrefix`, `PromptTooLong` (with the
        prefix's length); so are the later errors (`QueueTimeout`, `RequestFailed`, `EngineStopped`).
        """
        grammar = None
        if request.params.structured is not None:  # compiled first: its refusals come before queueing
            self._check_accepting()
            request.params.validate()
            grammar = await self.grammars.prepare(request.tenant, request.params.structured)
        state = self._admit(request, grammar)
        assert state.handle is not None
        return state.handle

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """`add_request` as a plain async iterator: admission errors come from the first `__anext__`.
        Closing the iterator early (or cancelling the consuming task) aborts the request."""
        handle = await self.add_request(request)
        try:
            async for event in handle:
                yield event
        finally:
            handle.abort()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids (ids are checked against the text vocabulary). Safe in worker threads:
        the API tokenises long prompts off the event loop and submits the ids."""
        return tokenize_prompt(self.tokenizer, prompt, self.model.vocab_size)

    def _check_accepting(self) -> None:
        if not self._accepting or not self.healthy:
            raise EngineStopped("the engine is not accepting requests" + failure_note(self.failure))

    def _admit(self, request: GenerationRequest, grammar: CompiledConstraint | None = None) -> Request:
        """Checks that need no store read, then queue the request at once (see `_load_prefix`)."""
        self._check_accepting()
        params = request.params
        params.validate()
        token_ids = self.tokenize(request.prompt)
        if request.task is not None:
            if self.prefix_cache is None:
                raise UnknownTask(f"task {request.task!r}: this engine runs without a prefix store")
            try:
                validate_name(request.tenant, "tenant")
                validate_name(request.task, "task")
            except InvalidName as exc:
                raise InvalidRequest(str(exc)) from None
        # Without its prefix: what the prefix adds is checked once it is located (`_fit_prefix`).
        num_prompt = len(token_ids)
        self.model.check_lengths(num_prompt, params.max_new_tokens, None)
        bad_bias = [t for t in params.logit_bias if t >= self.model.vocab_size]
        if bad_bias:
            raise InvalidRequest(
                f"logit_bias token ids must be < {self.model.vocab_size}, got {bad_bias[:5]}"
            )
        seed = params.seed if params.seed is not None else new_seed()
        eos = None if params.ignore_eos else self.model.eos_token_id
        state = Request(
            request=request,
            token_ids=token_ids,
            num_prompt_tokens=num_prompt,
            seed=seed,
            arrival=time.monotonic(),
            detok=IncrementalDetokenizer(self.tokenizer, token_ids, params.max_new_tokens, params.stop, eos),
            reserved_tokens=self.model.reserved_tokens(num_prompt, params.max_new_tokens, None),
            prefix_ready=request.task is None,
            grammar=grammar,
        )
        state.slot = self.model.new_slot(state)
        state.handle = RequestHandle(
            state.request_id, state.events, lambda: self._finish_outside(state, "cancelled")
        )
        # May push out a waiting request to make room (fair queue): see `_answer_departures`.
        self.scheduler.add(state)
        self._requests[state.request_id] = state
        if request.task is not None:
            load = asyncio.create_task(self._load_prefix(state), name=f"prefix-{state.request_id}")
            self._prefix_loads.add(load)
            load.add_done_callback(self._prefix_loads.discard)
        self._wake.set()
        return state

    async def _load_prefix(self, state: Request) -> None:
        """While the request waits in the queue: locate its prefix (a store read on a miss, then
        validation), check the request fits with it, have the backend place it, then let the scheduler
        admit the request. Runs as the request's own task, so a slow store read holds back no caller,
        no step and no other request; the queue timeout bounds it. A failure ends this request alone:
        an admission error (`UnknownTask`, `StoreUnavailable`, `InvalidPrefix`, `PromptTooLong`, ...)
        reaches its handle as it is; a failure placing it as `RequestFailed`."""
        assert self.prefix_cache is not None
        request = state.request
        assert request.task is not None
        try:
            route_key = request.route_key or request.request_id  # pins a traffic split
            located = await self.prefix_cache.locate(request.tenant, request.task, route_key)
            if state.done:  # timed out or aborted during the store read
                return
            params = request.params
            self.model.check_lengths(state.num_prompt_tokens, params.max_new_tokens, located)
            reserved = self.model.reserved_tokens(state.num_prompt_tokens, params.max_new_tokens, located)
            self.scheduler.reserve(state.request_id, reserved)
        except Exception as exc:
            self._fail(state, exc, observe=False)  # refused, as at admission: not a finished request
            return
        state.reserved_tokens = reserved
        state.prefix = located
        assert state.handle is not None
        state.handle.prefix_version, state.handle.prefix_variant = located.version, located.variant
        try:
            await self.model.place_prefix(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("placing the prefix of request %s failed", state.request_id)
            failure = RequestFailed(f"loading the task's prefix failed ({type(exc).__name__})")
            failure.__cause__ = exc
            self._fail(state, failure)
            return
        if not state.done:
            self.scheduler.mark_ready(state.request_id)
            self._wake.set()

    # ---- endings ------------------------------------------------------------------------------
    def _end(self, state: Request, reason: LeaveReason) -> None:
        """The request is over for its caller: it leaves the scheduler (reported in the next plan's
        `left`) and the backend stops running it."""
        state.done = True
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self.scheduler.abort(state.request_id, reason)
        self.model.release(state)
        self._wake.set()

    def _finish_outside(self, state: Request, reason: FinishReason) -> None:
        """End a request for a reason outside the model (cancelled): its last event, then it leaves."""
        if state.done:
            return
        self._end(state, "aborted")
        text = state.detok.finish(reason)
        state.events.put_nowait(self._event(state, None, text, reason))
        self._observe_finish(state, reason)

    def _fail(self, state: Request, exc: BaseException, observe: bool = True) -> None:
        """End the request with `exc` (its handle raises it). `observe=False`: a refusal at admission
        (unknown task, store down, ...), which the metrics do not count as a finished request."""
        if state.done:
            return
        self._end(state, "failed")
        state.events.put_nowait(exc)
        if observe:
            self._observe_finish(state, "error")

    def _finished(self, state: Request, reason: FinishReason) -> StepOutput:
        """Finished (length, EOS, stop sequence): it leaves, and the backend stops running it."""
        state.done = True
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self.model.release(state)
        self._observe_finish(state, reason)
        return StepOutput(state.request_id, _LEAVE_REASONS.get(reason, "length"))

    def _event(
        self,
        state: Request,
        token: int | None,
        text: str,
        reason: FinishReason | None,
        logprob: float | None = None,
    ) -> StreamEvent:
        return StreamEvent(
            request_id=state.request_id,
            token_id=token,
            text=text,
            finish_reason=reason,
            num_prompt_tokens=state.num_prompt_tokens,
            num_generated_tokens=state.num_generated_tokens,
            seed=state.seed,
            prefix_version=None if state.prefix is None else state.prefix.version,
            prefix_variant=None if state.prefix is None else state.prefix.variant,
            generated_text=state.detok.text if reason is not None else None,
            token_logprob=logprob,
        )

    def _observe_finish(self, state: Request, reason: str) -> None:
        self.observer.on_finish(
            reason,
            state.num_prompt_tokens,
            state.num_generated_tokens,
            time.monotonic() - state.arrival,
            state.request.tenant,
            state.request.task,
        )

    # ---- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                if not self.scheduler.has_work():
                    self._wake.clear()
                    woken_by_clock = await self._idle()
                    self.model.check_alive()
                    if not woken_by_clock:
                        continue
                    # Woken by the clock with requests still waiting for their prefix: `schedule`
                    # answers those that waited too long.
                self._wake.clear()
                plan = self.scheduler.schedule()
                self._answer_departures(plan.left)
                now = time.monotonic()
                for rid in plan.prefill_ids:
                    self.observer.on_queue_time(now - self._requests[rid].arrival)
                result = await self.model.step(plan, self._requests, self._wake)
                self._apply(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not isinstance(exc, EngineDead):
                logger.exception("engine loop failed; failing all pending requests")
            self._die(exc.__cause__ if isinstance(exc, EngineDead) and exc.__cause__ else exc)

    async def _idle(self) -> bool:
        """Sleep until woken, the earliest waiting request's queue deadline, or the backend's health
        check; returns True when the clock woke it."""
        deadlines = [d for d in (self.scheduler.next_deadline(),) if d is not None]
        if self.model.health_check_s is not None:
            deadlines.append(time.monotonic() + self.model.health_check_s)
        if not deadlines:
            await self._wake.wait()
            return False
        # Just past the deadline: the scheduler expires requests that waited *more* than the timeout.
        # asyncio.wait, not wait_for: wait_for can swallow the loop's cancellation (`stop`) when the
        # wake-up lands at the same moment (Python < 3.12), and the loop then never ends.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter}, timeout=max(0.0, min(deadlines) - time.monotonic()) + _DEADLINE_SLACK_S
            )
        finally:
            waiter.cancel()
        return not done

    def _die(self, exc: BaseException) -> None:
        if not self.healthy:
            return
        self.healthy = False
        self.failure = exc
        for state in list(self._requests.values()):
            self._fail(state, EngineStopped(f"the engine failed: {exc!r}"))

    def _answer_departures(self, left: list[RowLeft]) -> None:
        """The scheduler dropped waiting requests: those that waited too long get `QueueTimeout`, those
        the fair queue pushed out to make room for a tenant under its share get `QueueFull`. (The other
        departures were answered where they happened.)"""
        timeout = self.config.limits.queue_timeout_s
        for row in left:
            state = self._requests.get(row.request_id)
            if state is None:
                continue
            if row.reason == "timed_out":
                self._fail(state, QueueTimeout(f"request waited more than {timeout}s in the queue"))
            elif row.reason == "pushed_out":
                self._fail(state, QueueFull("the queue is full and this tenant is over its share"))

    def _apply(self, result: StepResult) -> None:
        """Event loop: the step's tokens into events, finishes into the scheduler, its stats into the
        metrics."""
        for state, exc in result.failed.values():
            # The client gets the exception's type only; the details were logged where it was caught.
            failure = RequestFailed(f"the model failed on this request ({type(exc).__name__})")
            failure.__cause__ = exc
            self._fail(state, failure)
        now = time.monotonic()
        finished: list[StepOutput] = []
        tasks: set[str] = set()
        for output in result.outputs:
            state = output.request
            if state.done:  # ended while the step ran (the backend drops its row)
                continue
            tasks.add(state.task_label)
            ended = self._apply_token(state, output, now)
            if ended is not None:
                finished.append(ended)
        self.scheduler.update(finished)
        if result.num_rows:
            self.observer.on_step(result.num_rows, len(tasks), self.kv_usage_ratio)
        if result.prompt_tokens or result.num_rows:
            self.observer.on_iteration(result.prompt_tokens, result.num_rows)

    def _apply_token(self, state: Request, output: TokenOutput, now: float) -> StepOutput | None:
        """One token (or the model's own end) of one request: its event, and its finish if it ends."""
        if output.token_id is None:  # the model stopped first (vLLM: a stop token, its length limit)
            reason = output.model_finish or "length"
            state.events.put_nowait(self._event(state, None, state.detok.finish(reason), reason))
            return self._finished(state, reason)
        try:
            text = state.detok.add_token(output.token_id)
        except Exception as exc:
            logger.exception("detokenizing request %s failed", state.request_id)
            self._fail(state, RequestFailed(f"detokenizing failed on this request ({type(exc).__name__})"))
            return None
        if state.last_token_time is None:
            self.observer.on_first_token(now - state.arrival)
        else:
            self.observer.on_token(now - state.last_token_time)
        state.last_token_time = now
        finish = state.detok.finish_reason
        event = self._event(state, output.token_id, text, finish, output.logprob)
        event.top_tokens = output.top_tokens
        if output.prompt_scores is not None:
            event.prompt_token_ids = state.prompt_ids
            event.prompt_logprobs, event.prompt_top_tokens = output.prompt_scores
        state.events.put_nowait(event)
        return None if finish is None else self._finished(state, finish)


def _prefix_bytes(loaded: LoadedModel, length: int) -> int:
    """Bytes of one prefix of `length` positions, every prefix kind the model has, in its dtype."""
    spec = loaded.spec
    positions = spec.num_layers * spec.num_heads  # decoder self-attention
    if spec.kind == "encoder-decoder":  # encoder self-attention and decoder cross-attention too
        positions += spec.num_encoder_layers * spec.num_encoder_heads + spec.num_layers * spec.num_heads
    return positions * 2 * length * spec.head_dim * loaded.dtype.itemsize  # K and V


if TYPE_CHECKING:

    def _satisfies_the_interface(engine: EngineFrontEnd) -> ServingEngine:
        return engine  # mypy: the front end is what the API and the metrics type against

"""The engine: continuous batching of prefix-tuned generation over one frozen model.

One asyncio task runs the loop `schedule() -> execute (model + sampling) -> update()`. Each step's
tensor work (freeing rows, one decode of every running row, one prefill of the newly admitted rows,
sampling) runs in a single worker thread via `run_in_executor`, so the event loop stays free to accept
and stream requests. Scheduler, request states and detokenizers are touched only on the event loop.

The contract (issue 15): `add_request(request)` raises every admission error itself and returns a
`RequestHandle` whose events stream (`async for event in handle`) and which `abort()`s the request;
`generate()` is a thin wrapper over it, kept for callers that want a plain async iterator.

Rows of one batch carry different tasks' prefixes. A request is queued at once; while it waits, its
own task (`_load_prefix`) locates its prefix in the tiered `PrefixCache` (a store read and validation
on a miss: unknown tasks, a store that is down and prefixes that do not fit fail here, on the handle)
and brings it to the device (a copy from a worker thread, on a side stream on CUDA). The scheduler
admits only requests whose prefix is on the device, so neither a store read nor a copy ever stalls a
step or another request, and requests of resident tasks go ahead of one whose prefix still loads. The
queue timeout covers the whole wait, a store read that never returns included.

Membership: the scheduler decides who runs; every request that leaves (finished, aborted, failed,
timed out) is reported once in the next plan's `left`, and the step frees exactly those rows
(`plan.released_ids`). Nothing else releases runner rows.

Failure isolation: an error while preparing or prefilling one request fails that request alone (its
iterator raises `RequestFailed`); an error that breaks the step itself (decode, sampling) marks the
engine unhealthy (`healthy` False, `failure` set) and every pending iterator raises `EngineStopped`.

Not supported: beam search (`num_beams > 1`); the API layer refuses it. Each request produces one
sequence, sampled or greedy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling.models import LoadedModel
from prefix_store.base import InvalidName, PrefixStore, validate_name
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidRequest,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    UnknownTask,
)
from server.engine.fair_queue import FairQueueConfig
from server.engine.grammar import GrammarCompiler, RowGrammar
from server.engine.handle import RequestHandle
from server.engine.observer import EngineObserver
from server.engine.paged_kv import PagedKVCache
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats, ResolvedPrefix
from server.engine.prefix_transfer import DevicePrefix, wait_until_ready
from server.engine.request_state import RequestEndings, RequestState, failure_note, tokenize_prompt
from server.engine.runner import ModelRunner, PrefillItem
from server.engine.sampling import RowSampling, SampleOutput, Sampler, make_row, new_seed, prompt_scores
from server.engine.scheduler import (
    LeaveReason,
    RowLeft,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerPlan,
    StepOutput,
)
from server.engine.task_uses import TaskUses
from server.engine.types import FinishReason, GenerationRequest, StreamEvent
from server.limits import Limits

logger = logging.getLogger(__name__)


# `_idle` wakes this long after the earliest queue deadline (a timeout is "waited more than").
_DEADLINE_SLACK_S = 0.001

# How the detokenizer's finish reasons read in the scheduler's departures.
_LEAVE_REASONS: dict[FinishReason, LeaveReason] = {
    "length": "length",
    "eos_token": "eos",
    "stop_sequence": "stop",
}


@dataclass
class EngineConfig:
    """The engine's limits (the one `Limits` object, built from the settings) plus internal tuning."""

    limits: Limits = field(default_factory=Limits)
    fair_queue: FairQueueConfig = field(default_factory=FairQueueConfig)  # issue 18: tenant weights, bounds
    kv_block_size: int = 16  # issue 15: tokens per block of the paged KV pools (GPT-2, BART)
    cuda_graphs: bool = True  # GPT-2 decode steps as CUDA graphs (ignored off CUDA; gpt2_runner)
    torch_compile: bool = False  # GPT-2: torch.compile the static decode step's block output
    static_decode: bool | None = (
        None  # GPT-2: force the static decode path on/off (tests: on CPU); None: auto
    )


@dataclass(kw_only=True)
class _Request(RequestState):
    """Engine-side state of one request (event loop thread only); `prefix` is on the host until on the
    device (`on_device`)."""

    sampling: RowSampling
    next_token: int | None = None  # sampled, not yet fed to the model


@dataclass
class _StepWork:
    release_ids: list[str]
    decode_tokens: dict[str, int]
    prefill: list[PrefillItem]
    rows: dict[str, RowSampling]
    # The prefixes this step's prefill reads: on CUDA the step waits for their copies (on the GPU).
    prefixes: list[DevicePrefix] = field(default_factory=list)
    # The states the step runs for: `_apply` must not hand a result to a newer request that reused
    # the id of one aborted while the step ran.
    states: dict[str, _Request] = field(default_factory=dict)


@dataclass
class _StepResult:
    request_ids: list[str]
    sampled: SampleOutput
    failed: dict[str, BaseException]
    prompt_tokens: int = 0  # prompt tokens computed by the step (its prefill chunks that ran)
    # Per request that asked: the prompt's logprobs and, with top_n_tokens, its alternatives.
    prompt_logprobs: dict[str, tuple[list[float | None], list[list[tuple[int, float]]] | None]] = field(
        default_factory=dict
    )


class Engine(RequestEndings):
    """Serves `generate` requests for many tasks over one model. See the module docstring."""

    backend = "native"  # the vLLM backend's engine says "vllm"

    def __init__(
        self,
        loaded: LoadedModel,
        store: PrefixStore | None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.tokenizer = loaded.tokenizer
        self.runner = runner or _default_runner(loaded, self.config)
        self.sampler = Sampler()
        limits = self.config.limits
        # Structured output: constraints compiled (bounded, cached) to grammars the sampler masks with.
        self.grammars = GrammarCompiler(
            loaded.tokenizer, self.runner.vocab_size, self.runner.eos_token_id, limits, self.observer
        )
        # GPT-2 sizes its own paged pool from the budget in bytes; BART's pools fit max_batch_size full
        # rows, and the config's budget (in `reserved_tokens` units) admits.
        kv_budget = (
            self.runner.kv_capacity_tokens
            or limits.kv_budget_tokens
            or limits.max_batch_size * self.runner.max_positions
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=limits.max_batch_size,
                max_prefill_tokens=limits.max_prefill_tokens,
                kv_budget_tokens=kv_budget,
                max_waiting=limits.max_waiting,
                queue_timeout_s=limits.queue_timeout_s,
                fair_queue=self.config.fair_queue,
                chunked_prefill=self.runner.supports_chunked_prefill,
            )
        )
        self.prefix_cache: PrefixCache | None = None
        if store is not None:
            self.prefix_cache = PrefixCache(
                store,
                loaded.spec,
                loaded.device,
                loaded.dtype,
                limits,
                listener=self.observer,
            )
        # Called in the worker thread with (request ids, logits [N, V]) of every step; tests use it.
        self.debug_logits_hook: Any = None
        self.healthy = True
        self.failure: BaseException | None = None
        self._requests: dict[str, _Request] = {}
        self._prefix_loads: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._accepting = False
        self._loop_task: asyncio.Task[None] | None = None
        self._uses = TaskUses(self.prefix_cache) if self.prefix_cache is not None else None
        self._executor: ThreadPoolExecutor | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop (and subscribe the prefix cache to store changes)."""
        if self._loop_task is not None:
            return
        if self.prefix_cache is not None:
            self.prefix_cache.start()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixserve-engine")
        warm_up = getattr(self.runner, "warm_up", None)  # GPT-2: capture common CUDA graphs before requests
        if warm_up is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, warm_up)
        self._wake = asyncio.Event()
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name="prefixserve-engine-loop")
        if self._uses is not None:
            self._uses.start()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `drain_timeout_s`, then
        end the rest with finish_reason "cancelled"."""
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
        if self._executor is not None:
            # The step in flight (if any) completes first; wait for it off the event loop.
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None

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
        return self.scheduler.kv_usage_ratio

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """The runner's KV memory (GPT-2: `used_bytes`, `peak_bytes`, `prefix_bytes`, ...)."""
        return self.runner.kv_stats(reset_peaks)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats

    # ---- device residency and warm start (what routers and a restarted replica use) -------------
    @property
    def resident_prefixes(self) -> list[tuple[str, str]]:
        """(tenant, task) pairs whose prefix is on the device now (the prefix cache's device tier)."""
        return [] if self.prefix_cache is None else self.prefix_cache.resident_tasks()

    @property
    def resident_prefix_capacity(self) -> int:
        """How many prefixes the device tier holds: its bytes // the bytes of one prefix of
        `max_prefix_length` positions (every prefix kind the model has) in the serving dtype. Shorter
        prefixes fit more, so this is a floor; never below what is resident now."""
        if self.prefix_cache is None:
            return 0
        spec, length = self.loaded.spec, self.config.limits.max_prefix_length
        positions = spec.num_layers * spec.num_heads  # decoder self-attention
        if spec.kind == "encoder-decoder":  # encoder self-attention and decoder cross-attention too
            positions += spec.num_encoder_layers * spec.num_encoder_heads + spec.num_layers * spec.num_heads
        element_bytes = torch.tensor([], dtype=self.loaded.dtype).element_size()
        one_prefix = positions * 2 * length * spec.head_dim * element_bytes  # K and V
        capacity = self.prefix_cache.budget_bytes("device") // max(1, one_prefix)
        return max(capacity, len(self.resident_prefixes))

    async def warm(self, tenant: str, task: str) -> bool:
        """Load the task's prefix (the version a request would get) into the host tier, and into the
        device tier if it fits there without evicting anything, without a request. False (never
        raises) if it could not: no store, unknown task, store down, blob invalid, engine failed."""
        if self.prefix_cache is None or not self.healthy:
            return False
        try:
            found = await self.prefix_cache.warm(tenant, task)
            if not found.on_device and found.artifact.nbytes <= self.prefix_cache.free_bytes("device"):
                await self.prefix_cache.to_device(tenant, task, found)
        except Exception as exc:  # a warm start is best effort: the first request reads it again
            logger.info("warming %s/%s failed: %s", tenant, task, type(exc).__name__)
            return False
        return True

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
            grammar = RowGrammar(await self.grammars.prepare(request.tenant, request.params.structured))
        state = await self._admit(request, grammar)
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

    async def _admit(self, request: GenerationRequest, grammar: RowGrammar | None = None) -> _Request:
        """Checks that need no store read, then queue the request at once (see `_load_prefix`)."""
        self._check_accepting()
        params = request.params
        params.validate()
        prompt_ids = self.tokenize(request.prompt)
        if request.task is not None:
            if self.prefix_cache is None:
                raise UnknownTask(f"task {request.task!r}: this engine runs without a prefix store")
            try:
                validate_name(request.tenant, "tenant")
                validate_name(request.task, "task")
            except InvalidName as exc:
                raise InvalidRequest(str(exc)) from None
        # Without its prefix: what the prefix adds is checked once it is located (`_fit_prefix`).
        self.runner.validate_lengths(len(prompt_ids), params.max_new_tokens, None)
        bad_bias = [t for t in params.logit_bias if t >= self.runner.vocab_size]
        if bad_bias:
            raise InvalidRequest(
                f"logit_bias token ids must be < {self.runner.vocab_size}, got {bad_bias[:5]}"
            )
        seed = params.seed if params.seed is not None else new_seed()
        eos = None if params.ignore_eos else self.runner.eos_token_id
        state = _Request(
            request=request,
            prompt_ids=prompt_ids,
            prefix=None,
            seed=seed,
            sampling=make_row(params, seed, prompt_ids, grammar=grammar),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.max_new_tokens, params.stop, eos),
            arrival=time.monotonic(),
        )
        state.handle = RequestHandle(
            state.request_id, state.events, lambda: self._finish_outside(state, "cancelled")
        )
        self.scheduler.add(  # may push out a waiting request to make room (fair_queue): see `_answer_departures`
            ScheduledRequest(
                request_id=request.request_id,
                num_prompt_tokens=len(prompt_ids),
                reserved_tokens=self.runner.reserved_tokens(len(prompt_ids), params.max_new_tokens, None),
                arrival_time=state.arrival,
                tenant=request.tenant,
                priority=request.priority,
                cost=params.max_new_tokens,
                prefix_ready=request.task is None,
            )
        )
        self._requests[request.request_id] = state
        if request.task is not None:
            load = asyncio.create_task(self._load_prefix(state), name=f"prefix-{request.request_id}")
            self._prefix_loads.add(load)
            load.add_done_callback(self._prefix_loads.discard)
        self._wake.set()
        return state

    def _check_accepting(self) -> None:
        if not self._accepting or not self.healthy:
            raise EngineStopped("the engine is not accepting requests" + failure_note(self.failure))

    async def _load_prefix(self, state: _Request) -> None:
        """While the request waits in the queue: locate its prefix (a store read on a miss, then
        validation), check the request fits with it, bring it to the device, then let the scheduler
        admit the request. Runs as the request's own task, so a slow store read holds back no caller,
        no step and no other request; the queue timeout bounds it. A failure ends this request alone:
        an admission error (`UnknownTask`, `StoreUnavailable`, `InvalidPrefix`, `PromptTooLong`, ...)
        reaches its handle as it is; a failed device copy as `RequestFailed`."""
        assert self.prefix_cache is not None
        request = state.request
        assert request.task is not None
        try:
            route_key = request.route_key or request.request_id  # issue 18: pins a traffic split
            located = await self.prefix_cache.locate(request.tenant, request.task, route_key)
            if state.done:  # timed out or aborted during the store read
                return
            self._fit_prefix(state, located)
        except Exception as exc:
            self._fail(state, exc, observe=False)  # refused, as at admission: not a finished request
            return
        try:
            state.prefix = await self.prefix_cache.to_device(request.tenant, request.task, located)
        except Exception as exc:
            logger.exception("loading the prefix of request %s to the device failed", state.request_id)
            failure = RequestFailed(f"loading the task's prefix failed ({type(exc).__name__})")
            failure.__cause__ = exc
            self._fail(state, failure)
            return
        if not state.done:
            self.scheduler.mark_ready(state.request_id)
            self._wake.set()

    def _fit_prefix(self, state: _Request, located: ResolvedPrefix) -> None:
        """The request with its prefix: lengths checked again, its KV reservation grown by the prefix."""
        params, num_prompt = state.request.params, len(state.prompt_ids)
        self.runner.validate_lengths(num_prompt, params.max_new_tokens, located.artifact)
        reserved = self.runner.reserved_tokens(num_prompt, params.max_new_tokens, located.artifact)
        self.scheduler.reserve(state.request_id, reserved)
        state.prefix = located
        assert state.handle is not None
        state.handle.prefix_version, state.handle.prefix_variant = located.version, located.variant

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids (ids are checked against the vocabulary). Safe in worker threads: the
        API tokenises long prompts off the event loop and submits the ids."""
        return tokenize_prompt(self.tokenizer, prompt, self.runner.vocab_size)

    def _end(self, state: _Request, reason: LeaveReason) -> None:
        """The request is over for its caller; the scheduler reports it in the next plan's `left`."""
        state.done = True
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self.scheduler.abort(state.request_id, reason)
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.scheduler.has_work():
                    self._wake.clear()
                    if not await self._idle():
                        continue
                    # Woken by the clock with requests still waiting for their prefix: `schedule`
                    # answers those that waited too long.
                plan = self.scheduler.schedule()
                self._answer_departures(plan.left)
                work = self._prepare(plan)
                if not (work.release_ids or work.decode_tokens or work.prefill):
                    continue
                result = await loop.run_in_executor(self._executor, self._execute, work)
                self._apply(result, work.states)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("engine loop failed; failing all pending requests")
            self.healthy = False
            self.failure = exc
            for state in list(self._requests.values()):
                self._fail(state, EngineStopped(f"the engine failed: {exc!r}"))

    async def _idle(self) -> bool:
        """Sleep until woken. With requests waiting (for their prefix), wake at the earliest one's queue
        deadline as well, so its `QueueTimeout` comes on time; returns True when woken that way."""
        deadline = self.scheduler.next_deadline()
        if deadline is None:
            await self._wake.wait()
            return False
        # Just past the deadline: the scheduler expires requests that waited *more* than the timeout.
        # asyncio.wait, not wait_for: wait_for can swallow the loop's cancellation (`stop`) when the
        # wake-up lands at the same moment (Python < 3.12), and the loop then never ends.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter}, timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_SLACK_S
            )
        finally:
            waiter.cancel()
        return not done

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

    def _prepare(self, plan: SchedulerPlan) -> _StepWork:
        work = _StepWork(release_ids=plan.released_ids, decode_tokens={}, prefill=[], rows={})
        now = time.monotonic()
        for rid in plan.decode_ids:
            state = self._requests[rid]
            assert state.next_token is not None
            work.decode_tokens[rid] = state.next_token
            work.rows[rid] = state.sampling
            work.states[rid] = state
        for chunk in plan.prefill_chunks:
            rid = chunk.request_id
            state = self._requests[rid]
            prefix, key = state.prefix, None
            if prefix is not None:  # rows of one (task, version) share one copy of its prefix
                assert prefix.on_device, "admitted before its prefix was prefetched"
                key = (state.request.tenant, state.request.task, prefix.version)
                work.prefixes.append(prefix.device_prefix)
            artifact = None if prefix is None else prefix.artifact
            work.prefill.append(
                PrefillItem(
                    rid,
                    state.prompt_ids,
                    artifact,
                    key,
                    chunk.start,
                    chunk.end,
                    prompt_logprobs=state.request.params.prompt_logprobs,
                )
            )
            work.rows[rid] = state.sampling
            work.states[rid] = state
            if chunk.start == 0:
                self.observer.on_queue_time(now - state.arrival)
        return work

    def _execute(self, work: _StepWork) -> _StepResult:
        """Worker thread: all tensor work of one step (one model pass, one sampling call)."""
        runner = self.runner
        runner.release(work.release_ids)
        for prefix in work.prefixes:
            wait_until_ready(prefix)
        failed: dict[str, BaseException] = {}
        if set(runner.request_ids) != set(work.decode_tokens):
            raise RuntimeError(
                f"runner rows {sorted(runner.request_ids)} != decoding {sorted(work.decode_tokens)}"
            )
        if not (work.decode_tokens or work.prefill):
            return _StepResult([], SampleOutput([], [], []), failed)
        try:
            ids, all_logits = runner.step(work.decode_tokens, work.prefill)
        except Exception:
            if not work.prefill:
                raise  # the decode step itself broke: the engine fails
            # A failed step changes nothing: find the culprit(s) by running decode, then each chunk alone.
            ids, parts = [], []
            if work.decode_tokens:
                ids, logits = runner.step(work.decode_tokens, [])
                parts.append(logits)
            for item in work.prefill:
                try:
                    item_ids, logits = runner.step({}, [item])
                    ids += item_ids
                    parts.append(logits)
                except Exception as exc:
                    logger.exception("prefill of request %s failed", item.request_id)
                    failed[item.request_id] = exc
            all_logits = torch.cat(parts) if parts else torch.empty(0)
        computed = sum(
            (len(item.input_ids) if item.end is None else item.end) - item.start
            for item in work.prefill
            if item.request_id not in failed
        )
        if not ids:
            return _StepResult([], SampleOutput([], [], []), failed, computed)
        if self.debug_logits_hook is not None:
            self.debug_logits_hook(list(ids), all_logits)
        sampled = self.sampler.sample(all_logits, [work.rows[r] for r in ids])
        prompt = {  # once the last chunk of a prompt ran (its logits were kept chunk by chunk)
            item.request_id: self._prompt_logprobs(item, work.rows[item.request_id].params.top_n_tokens)
            for item in work.prefill
            if item.prompt_logprobs and item.request_id in ids
        }
        return _StepResult(ids, sampled, failed, computed, prompt)

    def _prompt_logprobs(
        self, item: PrefillItem, top_n: int
    ) -> tuple[list[float | None], list[list[tuple[int, float]]] | None]:
        """The prompt's logprobs (and `top_n` alternatives per position) from the runner's prompt
        logits (all None, no alternatives, if it keeps none)."""
        take = getattr(self.runner, "take_prompt_logits", None)
        logits = None if take is None else take(item.request_id)  # [P, V] or None
        if logits is None:
            return [None] * len(item.input_ids), None
        return prompt_scores(logits, item.input_ids, top_n)

    def _apply(self, result: _StepResult, states: dict[str, _Request]) -> None:
        """Event loop: turn sampled tokens into events, detect finishes, update the scheduler."""
        now = time.monotonic()
        for rid, exc in result.failed.items():
            state = states.get(rid)
            if state is not None:
                # The client gets the exception's type only; the details (device, memory) were logged
                # where it was caught.
                failure = RequestFailed(f"the model failed on this request ({type(exc).__name__})")
                failure.__cause__ = exc
                self._fail(state, failure)
        outputs: list[StepOutput] = []
        tasks: set[str] = set()
        sampled = result.sampled
        for i, rid in enumerate(result.request_ids):
            token, logprob = sampled.token_ids[i], sampled.logprobs[i]
            state = states.get(rid)
            if state is None or state.done:  # aborted while the step ran; its row is released next step
                continue
            tasks.add(state.task_label)
            try:
                state.sampling.seen_ids.append(token)
                text = state.detok.add_token(token)
            except Exception as exc:
                logger.exception("detokenizing request %s failed", rid)
                self._fail(
                    state, RequestFailed(f"detokenizing failed on this request ({type(exc).__name__})")
                )
                continue
            if state.last_token_time is None:
                self.observer.on_first_token(now - state.arrival)
            else:
                self.observer.on_token(now - state.last_token_time)
            state.last_token_time = now
            state.next_token = token
            reason = state.detok.finish_reason
            event = self._event(state, token, text, reason, logprob)
            event.top_tokens = sampled.top_tokens[i]
            if rid in result.prompt_logprobs:
                event.prompt_token_ids = list(state.prompt_ids)
                event.prompt_logprobs, event.prompt_top_tokens = result.prompt_logprobs[rid]
            state.events.put_nowait(event)
            outputs.append(StepOutput(rid, 1, None if reason is None else _LEAVE_REASONS[reason]))
            if reason is not None:
                state.done = True
                del self._requests[rid]
                self._observe_finish(state, reason)
        self.scheduler.update(outputs)
        if result.request_ids:
            self.observer.on_step(len(result.request_ids), len(tasks), self.scheduler.kv_usage_ratio)
        if result.prompt_tokens or outputs:
            self.observer.on_iteration(result.prompt_tokens, len(outputs))


def _default_runner(loaded: LoadedModel, config: EngineConfig) -> ModelRunner:
    model_type = loaded.spec.model_type
    if model_type == "gpt2":
        from server.engine.gpt2_runner import GPT2Runner

        limits = config.limits
        budget = limits.kv_budget_bytes
        if budget is None and limits.kv_budget_tokens is not None:
            budget = limits.kv_budget_tokens * PagedKVCache.bytes_per_token(
                loaded.spec.num_layers, loaded.spec.num_heads, loaded.spec.head_dim, loaded.dtype
            )
        return GPT2Runner(
            loaded,
            limits.max_batch_size,
            budget,
            config.kv_block_size,
            cuda_graphs=config.cuda_graphs,
            torch_compile=config.torch_compile,
            static_decode=config.static_decode,
            static_prefix_arena_tokens=limits.static_prefix_arena_tokens,
            max_cuda_graphs=limits.max_cuda_graphs,
        )
    if model_type == "bart":
        from server.engine import bart_runner  # type: ignore[attr-defined]

        return bart_runner.BartRunner(  # type: ignore[no-any-return]
            loaded,
            max_rows=config.limits.max_batch_size,
            block_size=config.kv_block_size,
        )
    raise EngineError(f"no model runner for model_type {model_type!r}")

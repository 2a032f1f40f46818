"""`VllmEngine`: the engine's public API (docs/architecture.md) served by vLLM's `AsyncLLM`.

What stays ours, above vLLM: admission checks and errors, the fair queue (`Scheduler` with its
waiting-queue policy: vLLM's own queue never holds more than `vllm_max_queued` requests beyond the
batch, so our policy, not vLLM's FCFS, decides who runs next), the tiered prefix cache's host tier
and its store reads (`PrefixCache.locate`), detokenization, stop sequences, finish reasons, events
and the `EngineObserver` hooks. What vLLM does: the model, its paged KV cache and prefix caching,
continuous batching of what we admitted, sampling. Its engine core runs in its own process.

A request for a task runs as `[L virtual ids] + prompt ids` (see `model.py`): while it waits, its
task (`_place_prefix`) locates the prefix (store read and validation on a miss, as the native
engine), takes rows of the model's prefix table (`rows.PrefixRows`, LRU over unpinned prefixes) and,
unless the prefix is resident already, writes it there (a utility call into vLLM's worker); only then
may the scheduler admit it. Its vLLM `cache_salt` is "tenant/task@version#engine", so vLLM's prefix
cache shares a task's prefix blocks across its requests and never serves a request blocks computed
from another prefix that sat in the same rows (nor, on a core shared by several engines in turn,
another engine's bytes under the same name). vLLM itself runs in a `VllmCore` (`core.py`). The virtual positions never reach the caller: usage,
echo, logprobs and text count the prompt alone; `PromptTooLong` counts prefix + prompt + new tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from prefix_store.base import InvalidName, PrefixStore, validate_name
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import EngineConfig
from server.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    UnknownTask,
)
from server.engine.grammar import GrammarCompiler
from server.engine.handle import RequestHandle
from server.engine.observer import EngineObserver
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats
from server.engine.request_state import RequestEndings, RequestState, failure_note, tokenize_prompt
from server.engine.sampling import new_seed
from server.engine.scheduler import LeaveReason, ScheduledRequest, Scheduler, SchedulerConfig, StepOutput
from server.engine.task_uses import TaskUses
from server.engine.types import FinishReason, GenerationRequest, StreamEvent
from server.vllm_backend.core import VllmCore, VllmOptions, prefix_row_bytes, table_rows
from server.vllm_backend.params import vllm_sampling_params
from server.vllm_backend.rows import Key, PrefixRows, RowEntry
from server.vllm_backend.support import unsupported_reason
from server.vllm_backend.worker import encode_prefix

logger = logging.getLogger(__name__)

_DEADLINE_SLACK_S = 0.001
_HEALTH_CHECK_S = 1.0
_LEAVE_REASONS: dict[FinishReason, LeaveReason] = {
    "length": "length",
    "eos_token": "eos",
    "stop_sequence": "stop",
}


@dataclass(kw_only=True)
class _Request(RequestState):
    """Engine-side state of one request (event loop only)."""

    rows: RowEntry | None = None  # pinned while the request lives
    virtual_ids: list[int] = field(default_factory=list)
    drive: asyncio.Task[None] | None = None  # streams its vLLM request once admitted
    vllm_id: str = ""
    grammar: str | None = None  # structured output: the constraint as EBNF (vLLM enforces it)

    @property
    def prefix_key(self) -> Key | None:
        if self.prefix is None or self.request.task is None:
            return None
        return (self.request.tenant, self.request.task, self.prefix.version)


class VllmEngine(RequestEndings):
    """The vLLM backend; see the module docstring. Same public API as `server.engine.Engine`."""

    backend = "vllm"

    def __init__(
        self,
        loaded: LoadedModel,
        store: PrefixStore | None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        options: VllmOptions | None = None,
        core: VllmCore | None = None,
    ) -> None:
        if options is None and core is None:
            raise EngineError("VllmEngine needs VllmOptions(model_dir=...): vLLM loads the model itself")
        reason = unsupported_reason(loaded)
        if reason is not None:
            raise EngineError(f"the vLLM backend cannot serve this model: {reason}")
        self.loaded = loaded
        self.options = options
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.tokenizer = loaded.tokenizer
        spec = loaded.spec
        self.spec = spec
        self.vocab_size = spec.vocab_size  # text vocabulary; virtual ids start here
        self.max_positions = spec.max_positions
        limits = self.config.limits
        # A core given here is shared (tests): it outlives this engine and fixes the table's size.
        self._shared_core = core
        if core is not None:
            core.check_serves(loaded, limits)
            self.prefix_rows = core.prefix_rows
        else:
            self.prefix_rows = table_rows(loaded, limits)
        self.core: VllmCore | None = None
        # Part of every cache_salt: vLLM's prefix cache outlives an engine on a shared core, whose next
        # engine may hold other bytes under the same (tenant, task, version) in the same rows.
        self._salt_nonce = uuid.uuid4().hex[:12]
        self.rows = PrefixRows(self.prefix_rows)
        self._row_bytes = prefix_row_bytes(loaded)
        max_running = limits.max_batch_size + limits.vllm_max_queued
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=max_running,
                max_prefill_tokens=2**62,  # vLLM chunks prompts itself
                kv_budget_tokens=max_running * self.max_positions,  # vLLM's pool admits; ours never binds
                max_waiting=limits.max_waiting,
                queue_timeout_s=limits.queue_timeout_s,
                fair_queue=self.config.fair_queue,
                chunked_prefill=False,
            )
        )
        self.prefix_cache: PrefixCache | None = None
        if store is not None:
            # The host tier and the store reads are the native engine's; the device tier is our table.
            self.prefix_cache = PrefixCache(
                store, spec, torch.device("cpu"), loaded.dtype, limits, self.observer
            )
        self._uses = TaskUses(self.prefix_cache) if self.prefix_cache is not None else None
        self.healthy = True
        self.failure: BaseException | None = None
        self.llm: Any = None
        self._requests: dict[str, _Request] = {}
        self._writes: dict[Key, asyncio.Future[None]] = {}  # single-flight row writes
        self._rows_freed = asyncio.Event()
        self._prefix_loads: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._accepting = False
        self._loop_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._kv_usage = 0.0
        # Structured output: compiled by us (bounded, cached: the same grammar as the native engine's),
        # enforced by vLLM (its bitmask); no token masks of our own.
        self.grammars = GrammarCompiler(
            loaded.tokenizer,
            self.vocab_size,
            self.tokenizer.eos_token_id,
            limits,
            self.observer,
            token_masks=False,
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start vLLM (its engine core process; tens of seconds: it compiles the model) and our loop."""
        if self._loop_task is not None:
            return
        if self._shared_core is not None:
            self.core = self._shared_core
        else:
            assert self.options is not None
            self.core = VllmCore.start(self.loaded, self.config.limits, self.options)
        self.core.step_listeners.append(self._on_vllm_step)
        self.llm = self.core.llm
        if self.prefix_cache is not None:
            self.prefix_cache.start()
        self._wake = asyncio.Event()
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name="prefixserve-vllm-loop")
        if self._uses is not None:
            self._uses.start()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `drain_timeout_s`, then
        end the rest with finish_reason "cancelled", and shut vLLM down."""
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
        self.llm = None
        core, self.core = self.core, None
        if core is not None:
            with contextlib.suppress(ValueError):
                core.step_listeners.remove(self._on_vllm_step)
            if core is not self._shared_core:
                core.shutdown()  # on the loop: it cancels its output handler task (a few seconds at most)

    # ---- gauges -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def queue_refusal(self, tenant: str) -> str | None:
        return self.scheduler.refusal(tenant)

    @property
    def running_tasks(self) -> list[str]:
        return self._task_labels(self.scheduler.running_ids)

    @property
    def waiting_tasks(self) -> list[str]:
        return self._task_labels(self.scheduler.waiting_ids)

    @property
    def kv_usage_ratio(self) -> float:
        """vLLM's KV cache usage (0..1) as of its last step."""
        return self._kv_usage

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        row_bytes = prefix_row_bytes(self.loaded)
        return {
            "prefix_bytes": self.rows.used_rows * row_bytes,
            "prefix_entries": len(self.rows.resident()),
            "capacity_bytes": self.prefix_rows * row_bytes,
        }

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The host tier's statistics, with the device tier's bytes read from the prefix table now
        (the table is this backend's device tier; the prefix cache's own device tier stays unused)."""
        if self.prefix_cache is None:
            return None
        stats = self.prefix_cache.stats
        stats.bytes["device"] = self.rows.written_rows * self._row_bytes
        return stats

    @property
    def resident_prefixes(self) -> list[tuple[str, str]]:
        """(tenant, task) of the prefixes in the model's prefix table now."""
        return sorted({(tenant, task) for tenant, task, _ in self.rows.resident()})

    @property
    def resident_prefix_capacity(self) -> int:
        """Prefixes of `max_prefix_length` positions the table holds (shorter ones: more)."""
        return self.prefix_rows // self.config.limits.max_prefix_length

    async def warm(self, tenant: str, task: str) -> bool:
        """Load the task's current prefix into the host tier and the table without a request.
        False (never raises) if it could not (unknown task, store down, table full of pinned rows)."""
        if self.prefix_cache is None or self.llm is None or not self.healthy:
            return False
        try:
            validate_name(tenant, "tenant")
            validate_name(task, "task")
            found = await self.prefix_cache.warm(tenant, task)
            key = (tenant, task, found.version)
            entry = self._take_rows(key, found.artifact.prefix_length())
            if entry is None:
                return False
            try:
                await self._written(key, entry, found.artifact)
            finally:
                self._release_rows(key)
            return True
        except Exception as exc:  # a warm-up is a hint: never fail the caller
            logger.info("warming %s/%s failed: %r", tenant, task, exc)
            return False

    def _task_labels(self, ids: list[str]) -> list[str]:
        labels = {self._requests[r].task_label for r in ids if r in self._requests}
        return sorted(label for label in labels if label)

    def _on_vllm_step(self, scheduler: Any, iteration: Any) -> None:
        """vLLM's stats of one step: batch size and KV usage; tokens computed and generated (as vLLM's
        own iteration_tokens: prompt positions computed, virtual ones included, plus new tokens)."""
        if scheduler is not None:
            self._kv_usage = float(scheduler.kv_cache_usage)
            running = int(scheduler.num_running_reqs)
            if running:
                self.observer.on_step(running, len(self.running_tasks), self._kv_usage)
        if iteration is not None:
            computed = int(iteration.prompt_token_stats.computed)
            generated = int(iteration.num_generation_tokens)
            if computed or generated:
                self.observer.on_iteration(computed, generated)

    # ---- requests -----------------------------------------------------------------------------
    async def add_request(self, request: GenerationRequest) -> RequestHandle:
        """As `Engine.add_request` (the same errors, at the same points)."""
        grammar = None
        if request.params.structured is not None:  # compiled first: its refusals come before queueing
            self._check_accepting()
            request.params.validate()
            grammar = (await self.grammars.prepare(request.tenant, request.params.structured)).ebnf
        state = self._admit(request, grammar)
        assert state.handle is not None
        return state.handle

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        handle = await self.add_request(request)
        try:
            async for event in handle:
                yield event
        finally:
            handle.abort()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, checked against the text vocabulary (never a virtual id)."""
        return tokenize_prompt(self.tokenizer, prompt, self.vocab_size)

    def _check_accepting(self) -> None:
        if not self._accepting or not self.healthy:
            raise EngineStopped("the engine is not accepting requests" + failure_note(self.failure))

    def _admit(self, request: GenerationRequest, grammar: str | None = None) -> _Request:
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
        self._check_lengths(len(prompt_ids), params.max_new_tokens, 0)
        bad_bias = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad_bias:
            raise InvalidRequest(f"logit_bias token ids must be < {self.vocab_size}, got {bad_bias[:5]}")
        seed = params.seed if params.seed is not None else new_seed()
        eos = None if params.ignore_eos else self.tokenizer.eos_token_id
        state = _Request(
            request=request,
            prompt_ids=prompt_ids,
            seed=seed,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.max_new_tokens, params.stop, eos),
            arrival=time.monotonic(),
            grammar=grammar,
        )
        self.scheduler.add(
            ScheduledRequest(
                request.request_id,
                num_prompt_tokens=len(prompt_ids),
                reserved_tokens=len(prompt_ids) + params.max_new_tokens,
                tenant=request.tenant,
                priority=request.priority,
                cost=params.max_new_tokens,
                prefix_ready=request.task is None,
            )
        )
        self._requests[request.request_id] = state
        state.handle = RequestHandle(
            request.request_id, state.events, lambda: self._finish_outside(state, "cancelled")
        )
        if request.task is not None:
            load = asyncio.create_task(self._place_prefix(state))
            self._prefix_loads.add(load)
            load.add_done_callback(self._prefix_loads.discard)
        self._wake.set()
        return state

    def _check_lengths(self, num_prompt: int, max_new: int, prefix_length: int) -> None:
        if num_prompt + max_new + prefix_length > self.max_positions:
            raise PromptTooLong(num_prompt, prefix_length, max_new, self.max_positions)

    async def _place_prefix(self, state: _Request) -> None:
        """Waiting: locate the prefix, take table rows for it (waiting for rows other requests pin),
        write it unless resident, then let the scheduler admit the request."""
        request = state.request
        assert self.prefix_cache is not None and request.task is not None
        try:
            route_key = request.route_key or request.request_id  # pins a traffic split, as the native engine
            found = await self.prefix_cache.locate(request.tenant, request.task, route_key)
            length = found.artifact.prefix_length()
            self._check_lengths(len(state.prompt_ids), request.params.max_new_tokens, length)
        except Exception as exc:  # unknown task, store down, bad prefix, too long: refused as at admission
            self._fail(state, exc, observe=False)
            return
        if state.done:
            return
        state.prefix = found
        assert state.handle is not None
        state.handle.prefix_version, state.handle.prefix_variant = found.version, found.variant
        key = state.prefix_key
        assert key is not None
        try:
            while True:
                entry = self._take_rows(key, length)
                if entry is not None:
                    break
                # Every row is pinned by queued or running requests: wait for one to end.
                self._rows_freed.clear()
                await self._rows_freed.wait()
                if state.done:
                    return
            state.rows = entry
            if state.done:  # ended while it waited: give the rows back
                self._release(state)
                return
            await self._written(key, entry, found.artifact)
            if state.done:
                return
            state.virtual_ids = [self.vocab_size + row for row in entry.rows]
            self.scheduler.mark_ready(state.request_id)
            self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("writing the prefix of request %s into vLLM failed", state.request_id)
            failure = RequestFailed(f"loading this request's prefix failed ({type(exc).__name__})")
            failure.__cause__ = exc
            self._fail(state, failure)

    async def _written(self, key: Key, entry: RowEntry, artifact: PrefixArtifact) -> None:
        """The prefix is in its rows: written now (once however many requests wait) or already."""
        if entry.written:
            if self.prefix_cache is not None:
                self.prefix_cache.stats.hits["device"] += 1
            self.observer.on_cache_event("hit", "device")
            return
        write = self._writes.get(key)
        if write is None:
            write = asyncio.ensure_future(self._write(key, entry, artifact))
            self._writes[key] = write
            write.add_done_callback(lambda done: self._writes.pop(key, None))
        await asyncio.shield(write)

    async def _write(self, key: Key, entry: RowEntry, artifact: PrefixArtifact) -> None:
        prefix = artifact.prefixes["decoder"]  # [layers, 2, H, L, D]
        layers, _, heads, length, head_dim = prefix.shape
        kv = prefix.permute(0, 1, 3, 2, 4).reshape(
            layers, 2, length, heads * head_dim
        )  # [layers, 2, L, hidden]
        data, shape = await asyncio.to_thread(encode_prefix, kv)
        try:
            await self.llm.collective_rpc("prefixserve_write_rows", args=(entry.rows, data, shape))
        except BaseException:
            self.rows.drop(key)  # its rows hold nothing usable
            self._rows_freed.set()
            raise
        entry.written = True

    def _release(self, state: _Request) -> None:
        key = state.prefix_key
        if state.rows is not None and key is not None:
            state.rows = None
            self._release_rows(key)

    def _release_rows(self, key: Key) -> None:
        self.rows.release(key)
        self._rows_freed.set()

    def _take_rows(self, key: Key, length: int) -> RowEntry | None:
        """`key`'s rows, pinned: resident ones, else new ones (evicting unpinned prefixes, LRU first);
        None while pinned prefixes leave too few rows."""
        entry = self.rows.acquire(key)
        if entry is not None:
            return entry
        before = self.rows.evictions
        entry = self.rows.allocate(key, length)
        for _ in range(self.rows.evictions - before):
            if self.prefix_cache is not None:
                self.prefix_cache.stats.evictions["device"] += 1
            self.observer.on_cache_event("eviction", "device")
        return entry

    # ---- endings ------------------------------------------------------------------------------
    def _end(self, state: _Request, reason: LeaveReason) -> None:
        """The request is over for its caller: it leaves our scheduler, vLLM and its rows."""
        state.done = True
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self.scheduler.abort(state.request_id, reason)
        drive = state.drive
        if drive is not None and not drive.done() and drive is not asyncio.current_task():
            drive.cancel()  # vLLM's generate aborts its request when cancelled
        self._release(state)
        self._wake.set()

    def _finished(self, state: _Request, reason: FinishReason) -> None:
        """Finished by the model (length, EOS, stop sequence): leaves the running set."""
        state.done = True
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self.scheduler.update(
            [StepOutput(state.request_id, state.detok.num_generated, _LEAVE_REASONS[reason])]
        )
        self._release(state)
        self._observe_finish(state, reason)
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                plan = self.scheduler.schedule()
                for row in plan.left:
                    state = self._requests.get(row.request_id)
                    if state is None:
                        continue
                    if row.reason == "timed_out":
                        timeout = self.config.limits.queue_timeout_s
                        self._fail(state, QueueTimeout(f"request waited more than {timeout}s in the queue"))
                    elif row.reason == "pushed_out":
                        self._fail(state, QueueFull("the queue is full and this tenant is over its share"))
                for rid in plan.prefill_ids:
                    state = self._requests.get(rid)
                    if state is not None and not state.done:
                        self.observer.on_queue_time(time.monotonic() - state.arrival)
                        state.drive = asyncio.create_task(self._drive(state), name=f"vllm-{rid}")
                await self._idle()
                if self.llm is not None and self.llm.errored:  # its engine core process died
                    self._die(self.llm.dead_error)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("vLLM engine loop failed; failing all pending requests")
            self._die(exc)

    async def _idle(self) -> None:
        """Sleep until woken, the oldest waiting request's queue deadline, or `_HEALTH_CHECK_S`
        (vLLM's engine core is checked that often even when nothing runs)."""
        deadline = self.scheduler.next_deadline()
        deadline = (
            min(deadline, time.monotonic() + _HEALTH_CHECK_S)
            if deadline
            else time.monotonic() + _HEALTH_CHECK_S
        )
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_SLACK_S)
        finally:
            waiter.cancel()

    def _die(self, exc: BaseException) -> None:
        if not self.healthy:
            return
        self.healthy = False
        self.failure = exc
        for state in list(self._requests.values()):
            self._fail(state, EngineStopped(f"the engine failed: {exc!r}"))

    async def _drive(self, state: _Request) -> None:
        """Stream one admitted request through vLLM, turning its tokens into our events."""
        from vllm.inputs import TokensPrompt

        params = state.request.params
        prompt: dict[str, Any] = {"prompt_token_ids": state.virtual_ids + state.prompt_ids}
        key = state.prefix_key
        if key is not None:
            prompt["cache_salt"] = f"{key[0]}/{key[1]}@{key[2]}#{self._salt_nonce}"
        state.vllm_id = f"{state.request_id}#{next(self._ids)}"
        sampling = vllm_sampling_params(params, state.seed, self.tokenizer.eos_token_id, state.grammar)
        first = True
        try:
            async for output in self.llm.generate(TokensPrompt(**prompt), sampling, state.vllm_id):  # type: ignore[typeddict-item]
                completion = output.outputs[0]
                logprobs = completion.logprobs or []
                for i, token in enumerate(completion.token_ids):
                    if state.done:
                        return
                    entry = logprobs[i] if i < len(logprobs) else {}
                    event = self._token_event(state, int(token), entry, params.top_n_tokens)
                    if first:
                        first = False
                        if params.prompt_logprobs:
                            self._add_prompt_logprobs(
                                state, event, output.prompt_logprobs, params.top_n_tokens
                            )
                    state.events.put_nowait(event)
                    if event.finish_reason is not None:
                        self._finished(state, event.finish_reason)
                        return
                if output.finished and not state.done:
                    # vLLM stopped first (a stop token our detokenizer skips, or its length limit).
                    reason: FinishReason = "eos_token" if completion.finish_reason == "stop" else "length"
                    text = state.detok.finish(reason)
                    state.events.put_nowait(self._event(state, None, text, reason))
                    self._finished(state, reason)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError) or (self.llm is not None and self.llm.errored):
                logger.exception("vLLM's engine core died")
                self._die(exc)
                return
            logger.exception("vLLM failed request %s", state.request_id)
            failure = RequestFailed(f"the model failed on this request ({type(exc).__name__})")
            failure.__cause__ = exc
            self._fail(state, failure)

    def _token_event(self, state: _Request, token: int, logprobs: Any, top_n: int) -> StreamEvent:
        now = time.monotonic()
        if state.last_token_time is None:
            self.observer.on_first_token(now - state.arrival)
        else:
            self.observer.on_token(now - state.last_token_time)
        state.last_token_time = now
        text = state.detok.add_token(token)
        own = logprobs.get(token) if logprobs else None
        event = self._event(
            state, token, text, state.detok.finish_reason, None if own is None else float(own.logprob)
        )
        event.top_tokens = _top(logprobs, top_n)
        return event

    def _add_prompt_logprobs(self, state: _Request, event: StreamEvent, entries: Any, top_n: int) -> None:
        """The prompt's logprobs net of the virtual positions (the first prompt token: None / [])."""
        skip = len(state.virtual_ids)
        prompt = state.prompt_ids
        logprobs: list[float | None] = [None]
        tops: list[list[tuple[int, float]]] = [[]]
        for p in range(1, len(prompt)):
            entry = entries[skip + p] if entries is not None and skip + p < len(entries) else None
            own = entry.get(prompt[p]) if entry else None
            logprobs.append(None if own is None else float(own.logprob))
            tops.append(_top(entry, top_n))
        event.prompt_token_ids = list(prompt)
        event.prompt_logprobs = logprobs
        if top_n > 0:
            event.prompt_top_tokens = tops


def _top(entry: Any, n: int) -> list[tuple[int, float]]:
    """The `n` most likely tokens of a vLLM logprobs entry as (id, logprob), most likely first."""
    if not entry or n <= 0:
        return []
    ranked = sorted(
        (
            (lp.rank, tok, float(lp.logprob))
            for tok, lp in entry.items()
            if lp.rank is not None and lp.rank <= n
        )
    )
    return [(tok, logprob) for _, tok, logprob in ranked[:n]]

"""`VllmBackend`: vLLM's `AsyncLLM` as a model backend of the engine front end.

What vLLM does here: the model pass, its paged KV cache and prefix caching, batching of what our
scheduler admitted (its own scheduler decides each step's batch), sampling. Its engine core runs in
its own process (`core.py`). What stays the front end's: admission, the fair queue (vLLM's own queue
never holds more than `vllm_max_queued` requests beyond the batch, so our policy, not vLLM's FCFS,
decides who runs next), the prefix store's host tier, detokenization and stop sequences.

A request for a task runs as `[L virtual ids] + prompt ids` (see `model.py`): while it waits,
`place_prefix` takes rows of the model's prefix table (`rows.PrefixRows`, LRU over unpinned
prefixes) and, unless the prefix is resident already, writes it there (a utility call into vLLM's
worker, in the serving dtype); only then may the scheduler admit it. Its vLLM `cache_salt` names
(tenant, task, version), the digest of its rows' bytes and this backend's nonce, so vLLM's prefix cache
shares a task's prefix blocks across its requests and never serves a request blocks computed from
other bytes that sat in the same rows (nor, on a core shared by several engines in turn, another
engine's). The virtual positions never reach the caller: usage, echo, logprobs and text count the
prompt alone; `PromptTooLong` counts prefix + prompt + new tokens.

Each admitted request is streamed through vLLM by its own task (`_drive`), which hands its tokens to
the front end's next `step`; a request's rows are released only once vLLM has its end (its stream
closed: finished, or the abort sent), never while vLLM may still compute its virtual positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.backend import EngineDead, PromptScores, StepResult, TokenOutput
from server.engine.errors import EngineError, PromptTooLong
from server.engine.fair_queue import FairQueueConfig
from server.engine.prefix_cache import ResolvedPrefix
from server.engine.request import Request
from server.engine.scheduler import SchedulerConfig, SchedulerPlan
from server.engine.types import FinishReason
from server.limits import Limits
from server.vllm_backend.core import VllmCore, VllmOptions, max_model_len, prefix_row_bytes, table_rows
from server.vllm_backend.params import vllm_sampling_params
from server.vllm_backend.rows import Key, PrefixRows, RowEntry
from server.vllm_backend.worker import encode_prefix

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """This backend's state of one request (`Request.slot`)."""

    rows: RowEntry | None = None  # its prefix's table rows, pinned until vLLM has its end
    virtual_ids: list[int] = field(default_factory=list)  # [L]: the ids naming those rows
    drive: asyncio.Task[None] | None = None  # streams it through vLLM once admitted
    vllm_id: str = ""
    ended_in_vllm: bool = False  # vLLM reported it finished: nothing left to abort


class VllmBackend:
    """See the module docstring; `server.engine.backend.ModelBackend`."""

    name = "vllm"
    health_check_s: float | None = 1.0  # vLLM's engine core (another process) is checked this often

    def __init__(
        self,
        loaded: LoadedModel,
        limits: Limits,
        options: VllmOptions | None = None,
        core: VllmCore | None = None,
    ) -> None:
        if options is None and core is None:
            raise EngineError(
                "the vLLM backend needs VllmOptions(model_dir=...): vLLM loads the model itself"
            )
        self.loaded = loaded
        self.limits = limits
        self.options = options
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.spec.vocab_size  # text vocabulary; virtual ids start here
        self.eos_token_id = loaded.tokenizer.eos_token_id
        self.max_positions = max_model_len(loaded, limits)  # prefix + prompt + new tokens
        # A core given here is shared (tests): it outlives this backend and fixes the table's size.
        self._shared_core = core
        if core is not None:
            core.check_serves(loaded, limits)
            self.prefix_rows = core.prefix_rows
        else:
            self.prefix_rows = table_rows(loaded, limits)
        self.core: VllmCore | None = None
        self.llm: Any = None
        # Part of every cache_salt: vLLM's prefix cache outlives an engine on a shared core, whose next
        # engine may hold other bytes under the same (tenant, task, version) in the same rows.
        self._salt_nonce = uuid.uuid4().hex[:12]
        self.rows = PrefixRows(self.prefix_rows)
        self._row_bytes = prefix_row_bytes(loaded)
        self._writes: dict[Key, asyncio.Future[None]] = {}  # single-flight row writes
        self._rows_freed = asyncio.Event()
        self._outputs: list[TokenOutput] = []  # streamed by the drives since the last step
        self._failed: dict[str, tuple[Request, BaseException]] = {}
        self._arrived = asyncio.Event()
        self._dead: BaseException | None = None
        self._drives: set[asyncio.Task[None]] = set()
        self._kv_usage = 0.0
        self._ids = 0
        self._observer: Any = None
        self._running_tasks: Callable[[], int] = lambda: 0

    # ---- the scheduler's limits and a request's size --------------------------------------------
    def scheduler_config(self, limits: Limits, fair_queue: FairQueueConfig) -> SchedulerConfig:
        max_running = limits.max_batch_size + limits.vllm_max_queued
        return SchedulerConfig(
            max_running=max_running,
            max_prefill_tokens=2**62,  # vLLM chunks prompts itself
            kv_budget_tokens=max_running * self.max_positions,  # vLLM's pool admits; ours never binds
            max_waiting=limits.max_waiting,
            queue_timeout_s=limits.queue_timeout_s,
            fair_queue=fair_queue,
            chunked_prefill=False,
        )

    def check_lengths(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> None:
        length = 0 if prefix is None else prefix.artifact.prefix_length()
        if num_prompt + max_new_tokens + length > self.max_positions:
            raise PromptTooLong(num_prompt, length, max_new_tokens, self.max_positions)

    def reserved_tokens(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> int:
        return num_prompt + max_new_tokens + (0 if prefix is None else prefix.artifact.prefix_length())

    def new_slot(self, request: Request) -> _Slot:
        return _Slot()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, observer: Any, running_tasks: Callable[[], int]) -> None:
        """Start vLLM (its engine core process; tens of seconds: it compiles the model)."""
        self._observer, self._running_tasks = observer, running_tasks
        if self._shared_core is not None:
            self.core = self._shared_core
        else:
            assert self.options is not None
            self.core = VllmCore.start(self.loaded, self.limits, self.options)
        self.core.step_listeners.append(self._on_vllm_step)
        self.llm = self.core.llm

    async def stop(self) -> None:
        """Shut vLLM down (unless its core is shared); the front end ended every request before."""
        for drive in list(self._drives):
            drive.cancel()
        if self._drives:
            await asyncio.wait(self._drives, timeout=5)
        self.llm = None
        core, self.core = self.core, None
        if core is not None:
            with contextlib.suppress(ValueError):
                core.step_listeners.remove(self._on_vllm_step)
            if core is not self._shared_core:
                core.shutdown()  # on the loop: it cancels its output handler task (a few seconds at most)

    def check_alive(self) -> None:
        if self._dead is None and self.llm is not None and self.llm.errored:  # its engine core died
            self._dead = self.llm.dead_error
        if self._dead is not None:
            raise EngineDead("vLLM's engine core died") from self._dead

    # ---- residency and memory -----------------------------------------------------------------
    def kv_usage_ratio(self) -> float | None:
        """vLLM's KV cache usage (0..1) as of its last step."""
        return self._kv_usage

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        return {
            "prefix_bytes": self.rows.used_rows * self._row_bytes,
            "prefix_entries": len(self.rows.resident()),
            "capacity_bytes": self.prefix_rows * self._row_bytes,
        }

    def device_prefix_bytes(self) -> int | None:
        """The table rows that hold a prefix: the table is this backend's device tier."""
        return self.rows.written_rows * self._row_bytes

    def resident_prefixes(self) -> list[tuple[str, str]] | None:
        return sorted({(tenant, task) for tenant, task, _ in self.rows.resident()})

    def resident_prefix_capacity(self, max_prefix_length: int) -> int | None:
        return self.prefix_rows // max_prefix_length

    def _on_vllm_step(self, scheduler: Any, iteration: Any) -> None:
        """vLLM's stats of one step: batch size and KV usage; tokens computed and generated (as vLLM's
        own iteration_tokens: prompt positions computed, virtual ones included, plus new tokens)."""
        if self._observer is None:
            return
        if scheduler is not None:
            self._kv_usage = float(scheduler.kv_cache_usage)
            running = int(scheduler.num_running_reqs)
            if running:
                self._observer.on_step(running, self._running_tasks(), self._kv_usage)
        if iteration is not None:
            computed = int(iteration.prompt_token_stats.computed)
            generated = int(iteration.num_generation_tokens)
            if computed or generated:
                self._observer.on_iteration(computed, generated)

    # ---- prefixes: table rows -----------------------------------------------------------------
    async def place_prefix(self, request: Request) -> None:
        """Take table rows for the located prefix (waiting for rows other requests pin), write it
        unless resident, and name the rows in the request's virtual ids."""
        key = request.prefix_key
        assert key is not None and request.prefix is not None
        slot: _Slot = request.slot
        length = request.prefix.artifact.prefix_length()
        while True:
            entry = self._take_rows(key, length)
            if entry is not None:
                break
            # Every row is pinned by queued or running requests: wait for one to end.
            self._rows_freed.clear()
            await self._rows_freed.wait()
            if request.done:
                return
        slot.rows = entry
        if request.done:  # ended while it waited: give the rows back
            self._release_rows(request)
            return
        await self._written(key, entry, request.prefix.artifact)
        slot.virtual_ids = [self.vocab_size + row for row in entry.rows]

    async def warm(self, key: tuple[str, str, int], found: ResolvedPrefix) -> bool:
        """Into the table (evicting only prefixes no request uses); False while pinned rows fill it."""
        entry = self._take_rows(key, found.artifact.prefix_length())
        if entry is None:
            return False
        try:
            await self._written(key, entry, found.artifact)
        finally:
            self.rows.release(key)
            self._rows_freed.set()
        return True

    async def _written(self, key: Key, entry: RowEntry, artifact: PrefixArtifact) -> None:
        """The prefix is in its rows: written now (once however many requests wait) or already."""
        if entry.written:
            self._observer.on_cache_event("hit", "device")
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
        data, dtype, shape, digest = await asyncio.to_thread(encode_prefix, kv, self.loaded.dtype)
        try:
            await self.llm.collective_rpc("prefixserve_write_rows", args=(entry.rows, data, dtype, shape))
        except BaseException:
            self.rows.drop(key)  # its rows hold nothing usable
            self._rows_freed.set()
            raise
        entry.digest, entry.written = digest, True

    def _take_rows(self, key: Key, length: int) -> RowEntry | None:
        """`key`'s rows, pinned: resident ones, else new ones (evicting unpinned prefixes, LRU first);
        None while pinned prefixes leave too few rows."""
        entry = self.rows.acquire(key)
        if entry is not None:
            return entry
        before = self.rows.evictions
        entry = self.rows.allocate(key, length)
        for _ in range(self.rows.evictions - before):
            self._observer.on_cache_event("eviction", "device")
        return entry

    def _release_rows(self, request: Request) -> None:
        slot: _Slot = request.slot
        key = request.prefix_key
        if slot.rows is not None and key is not None:
            slot.rows = None
            self.rows.release(key)
            self._rows_freed.set()

    # ---- running requests ---------------------------------------------------------------------
    def release(self, request: Request) -> None:
        """The request left: vLLM never had it (rows back now), or its stream is closed first (the
        abort reaches vLLM) and `_drive` gives the rows back after."""
        slot: _Slot = request.slot
        drive = slot.drive
        if drive is None:
            self._release_rows(request)
        elif not (drive.done() or slot.ended_in_vllm) and drive is not asyncio.current_task():
            drive.cancel()

    async def step(
        self, plan: SchedulerPlan, requests: dict[str, Request], wake: asyncio.Event
    ) -> StepResult:
        """Hand vLLM the newly admitted requests; return the tokens streamed since the last step,
        waiting (for tokens, a wake-up or the health check) while there are none."""
        for rid in plan.prefill_ids:
            request = requests[rid]
            if not request.done:
                slot: _Slot = request.slot
                slot.drive = asyncio.create_task(self._drive(request), name=f"vllm-{rid}")
                self._drives.add(slot.drive)
                slot.drive.add_done_callback(self._drives.discard)
        if not (self._outputs or self._failed) and self._drives:
            self._arrived.clear()
            waiters = {asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(wake.wait())}
            try:
                await asyncio.wait(waiters, timeout=self.health_check_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        self.check_alive()
        result = StepResult(self._outputs, self._failed)
        self._outputs, self._failed = [], {}
        return result

    def _emit(self, output: TokenOutput) -> None:
        self._outputs.append(output)
        self._arrived.set()

    async def _drive(self, request: Request) -> None:
        """Stream one admitted request through vLLM, handing its tokens to the next `step`."""
        from vllm.inputs import TokensPrompt

        slot: _Slot = request.slot
        params = request.params
        prompt: dict[str, Any] = {"prompt_token_ids": slot.virtual_ids + request.prompt_ids}
        key = request.prefix_key
        if key is not None and slot.rows is not None:
            # The rows' bytes, not only the version: blocks vLLM caches under this salt were computed
            # from exactly these rows (see rows.py).
            prompt["cache_salt"] = f"{key[0]}/{key[1]}@{key[2]}:{slot.rows.digest}#{self._salt_nonce}"
        self._ids += 1
        slot.vllm_id = f"{request.request_id}#{self._ids}"
        grammar = None if request.grammar is None else request.grammar.ebnf  # vLLM enforces it
        sampling = vllm_sampling_params(params, request.seed, self.eos_token_id, grammar)
        first, ended = True, False
        stream = self.llm.generate(TokensPrompt(**prompt), sampling, slot.vllm_id)  # type: ignore[typeddict-item]
        try:
            async for output in stream:
                if output.finished:  # vLLM is done with it: its rows may go before its last tokens do
                    slot.ended_in_vllm = True
                    self._release_rows(request)
                completion = output.outputs[0]
                logprobs = completion.logprobs or []
                for i, token in enumerate(completion.token_ids):
                    if request.done:
                        return
                    entry = logprobs[i] if i < len(logprobs) else {}
                    own = entry.get(token) if entry else None
                    scores = None
                    if first:
                        first = False
                        if params.prompt_logprobs:
                            scores = self._prompt_scores(request, output.prompt_logprobs, params.top_n_tokens)
                    self._emit(
                        TokenOutput(
                            request,
                            int(token),
                            None if own is None else float(own.logprob),
                            _top(entry, params.top_n_tokens),
                            scores,
                        )
                    )
                if output.finished and not request.done:
                    # vLLM's own end (a stop token, its length limit): the front end decides whether
                    # the tokens before it had ended the request already.
                    reason: FinishReason = "eos_token" if completion.finish_reason == "stop" else "length"
                    self._emit(TokenOutput(request, None, model_finish=reason))
                ended = ended or output.finished
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError) or (self.llm is not None and self.llm.errored):
                logger.exception("vLLM's engine core died")
                self._dead = exc
                self._arrived.set()
                return
            logger.exception("vLLM failed request %s", request.request_id)
            self._failed[request.request_id] = (request, exc)
            self._arrived.set()
            ended = True
        finally:
            if not (ended or request.done):  # a stream that stopped without vLLM's end: end it here
                self._emit(TokenOutput(request, None, model_finish="length"))
            # Closing vLLM's stream of a request it has not finished sends vLLM the abort (awaited); only
            # then may the rows be written with another prefix: a prompt whose virtual positions were
            # still being computed would otherwise read the new rows, and vLLM would cache them under
            # this request's salt.
            with contextlib.suppress(Exception):
                await stream.aclose()
            self._release_rows(request)

    def _prompt_scores(self, request: Request, entries: Any, top_n: int) -> PromptScores:
        """The prompt's logprobs net of the virtual positions (the first prompt token: None / [])."""
        slot: _Slot = request.slot
        skip = len(slot.virtual_ids)
        prompt = request.prompt_ids
        logprobs: list[float | None] = [None]
        tops: list[list[tuple[int, float]]] = [[]]
        for p in range(1, len(prompt)):
            entry = entries[skip + p] if entries is not None and skip + p < len(entries) else None
            own = entry.get(prompt[p]) if entry else None
            logprobs.append(None if own is None else float(own.logprob))
            tops.append(_top(entry, top_n))
        return logprobs, (tops if top_n > 0 else None)


def _top(entry: Any, n: int) -> list[tuple[int, float]]:
    """The `n` most likely tokens of a vLLM logprobs entry as (id, logprob), most likely first."""
    if not entry or n <= 0:
        return []
    ranked = sorted(
        (lp.rank, tok, float(lp.logprob)) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= n
    )
    return [(tok, logprob) for _, tok, logprob in ranked[:n]]

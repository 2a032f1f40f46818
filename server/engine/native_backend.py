"""Our model backend: continuous batching of mixed-task rows over our model runners.

Each step's tensor work (freeing the rows of requests that left, one pass over every decoding row and
the plan's prompt chunks, sampling) runs in one worker thread via `run_in_executor`, so the event loop
stays free to accept and stream requests; request records are read there but written only on the
loop. A task's prefix is placed in the prefix cache's device tier (a copy from a worker thread, on a
side stream on CUDA) while its request waits; rows of one (task, version) share one copy of it.

Failure isolation: an error in one request's prefill fails that request alone (the step is re-run
without it); an error in the decode step or the sampler breaks the engine (the front end fails every
request).

Not supported: beam search (`num_beams > 1`; the API layer refuses it). Each request produces one
sequence, sampled or greedy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling.models import LoadedModel
from server.engine.backend import PromptScores, StepResult, TokenOutput
from server.engine.errors import EngineError
from server.engine.fair_queue import FairQueueConfig
from server.engine.grammar import RowGrammar
from server.engine.paged_kv import PagedKVCache
from server.engine.prefix_cache import PrefixCache, ResolvedPrefix
from server.engine.prefix_transfer import DevicePrefix, wait_until_ready
from server.engine.request import Request
from server.engine.runner import ModelRunner, PrefillItem
from server.engine.sampling import RowSampling, SampleOutput, Sampler, prompt_scores
from server.engine.scheduler import SchedulerConfig, SchedulerPlan
from server.limits import Limits

logger = logging.getLogger(__name__)


@dataclass
class NativeOptions:
    """How our engine runs (not limits: these tune its machinery)."""

    kv_block_size: int = 16  # tokens per block of the paged KV pools (GPT-2, BART)
    cuda_graphs: bool = True  # GPT-2 decode steps as CUDA graphs (ignored off CUDA; gpt2_runner)
    torch_compile: bool = False  # GPT-2: torch.compile the static decode step's block output
    static_decode: bool | None = (
        None  # GPT-2: force the static decode path on/off (tests: on CPU); None: auto
    )


@dataclass
class _Row:
    """Our backend's state of one request (`Request.slot`)."""

    sampling: RowSampling  # its `seen_ids` is the record's `token_ids` (the same list)
    next_token: int | None = None  # sampled, not yet fed to the model


@dataclass
class _StepWork:
    release_ids: list[str]
    decode_tokens: dict[str, int]
    prefill: list[PrefillItem]
    states: dict[str, Request] = field(default_factory=dict)  # the records the step runs for
    # The prefixes this step's prefill reads: on CUDA the step waits for their copies (on the GPU).
    prefixes: list[DevicePrefix] = field(default_factory=list)


class NativeBackend:
    """See the module docstring; `server.engine.backend.ModelBackend`."""

    name = "native"
    health_check_s: float | None = None  # nothing outside this process to watch

    def __init__(
        self,
        loaded: LoadedModel,
        limits: Limits,
        options: NativeOptions | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.options = options or NativeOptions()
        self.runner = runner or default_runner(loaded, limits, self.options)
        self.vocab_size = self.runner.vocab_size
        self.eos_token_id = self.runner.eos_token_id
        self.limits = limits
        self.sampler = Sampler()
        self.prefix_cache: PrefixCache | None = None  # the front end's, set at `bind`
        # Called in the worker thread with (request ids, logits [N, V]) of every step; tests use it.
        self.debug_logits_hook: Any = None
        self._executor: ThreadPoolExecutor | None = None

    def bind(self, prefix_cache: PrefixCache | None) -> None:
        """The front end's prefix cache, whose device tier this backend places prefixes in."""
        self.prefix_cache = prefix_cache

    # ---- the scheduler's limits and a request's size --------------------------------------------
    def scheduler_config(self, limits: Limits, fair_queue: FairQueueConfig) -> SchedulerConfig:
        # GPT-2 sizes its own paged pool from the budget in bytes; BART's pools fit max_batch_size full
        # rows, and the config's budget (in `reserved_tokens` units) admits.
        kv_budget = (
            self.runner.kv_capacity_tokens
            or limits.kv_budget_tokens
            or limits.max_batch_size * self.runner.max_positions
        )
        return SchedulerConfig(
            max_running=limits.max_batch_size,
            max_prefill_tokens=limits.max_prefill_tokens,
            kv_budget_tokens=kv_budget,
            max_waiting=limits.max_waiting,
            queue_timeout_s=limits.queue_timeout_s,
            fair_queue=fair_queue,
            chunked_prefill=self.runner.supports_chunked_prefill,
        )

    def check_lengths(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> None:
        self.runner.validate_lengths(num_prompt, max_new_tokens, None if prefix is None else prefix.artifact)

    def reserved_tokens(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> int:
        artifact = None if prefix is None else prefix.artifact
        return self.runner.reserved_tokens(num_prompt, max_new_tokens, artifact)

    def new_slot(self, request: Request) -> _Row:
        grammar = None if request.grammar is None else RowGrammar(request.grammar)
        return _Row(
            RowSampling(request.params, request.seed, request.num_prompt_tokens, request.token_ids, grammar)
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, observer: Any, running_tasks: Callable[[], int]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixserve-engine")
        warm_up = getattr(self.runner, "warm_up", None)  # GPT-2: capture common CUDA graphs before requests
        if warm_up is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, warm_up)

    async def stop(self) -> None:
        if self._executor is not None:
            # The step in flight (if any) completes first; wait for it off the event loop.
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None

    def check_alive(self) -> None:
        pass

    # ---- prefixes -----------------------------------------------------------------------------
    async def place_prefix(self, request: Request) -> None:
        """Bring the located prefix to the device tier (one copy however many requests want it)."""
        assert self.prefix_cache is not None and request.prefix is not None and request.request.task
        request.prefix = await self.prefix_cache.to_device(
            request.tenant, request.request.task, request.prefix
        )

    async def warm(self, key: tuple[str, str, int], found: ResolvedPrefix) -> bool:
        """Into the device tier too when it fits there without evicting anything."""
        assert self.prefix_cache is not None
        if not found.on_device and found.artifact.nbytes <= self.prefix_cache.free_bytes("device"):
            await self.prefix_cache.to_device(key[0], key[1], found)
        return True

    def release(self, request: Request) -> None:
        """Nothing now: its row is freed by the next step (`plan.released_ids`)."""

    # ---- residency and memory -----------------------------------------------------------------
    def kv_usage_ratio(self) -> float | None:
        return None  # the scheduler's reservations are our pool's usage

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        return self.runner.kv_stats(reset_peaks)

    def device_prefix_bytes(self) -> int | None:
        return None

    def resident_prefixes(self) -> list[tuple[str, str]] | None:
        return None

    def resident_prefix_capacity(self, max_prefix_length: int) -> int | None:
        return None

    # ---- the step -----------------------------------------------------------------------------
    async def step(
        self, plan: SchedulerPlan, requests: dict[str, Request], wake: asyncio.Event
    ) -> StepResult:
        work = self._prepare(plan, requests)
        if not (work.release_ids or work.decode_tokens or work.prefill):
            return StepResult()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._execute, work)

    def _prepare(self, plan: SchedulerPlan, requests: dict[str, Request]) -> _StepWork:
        work = _StepWork(release_ids=plan.released_ids, decode_tokens={}, prefill=[])
        for rid in plan.decode_ids:
            state = requests[rid]
            row: _Row = state.slot
            assert row.next_token is not None
            work.decode_tokens[rid] = row.next_token
            work.states[rid] = state
        for chunk in plan.prefill_chunks:
            state = requests[chunk.request_id]
            prefix, key = state.prefix, None
            if prefix is not None:  # rows of one (task, version) share one copy of its prefix
                assert prefix.on_device, "admitted before its prefix was prefetched"
                key = state.prefix_key
                work.prefixes.append(prefix.device_prefix)
            work.prefill.append(
                PrefillItem(
                    state.request_id,
                    state.prompt_ids,
                    None if prefix is None else prefix.artifact,
                    key,
                    chunk.start,
                    chunk.end,
                    prompt_logprobs=state.params.prompt_logprobs,
                )
            )
            work.states[state.request_id] = state
        return work

    def _execute(self, work: _StepWork) -> StepResult:
        """Worker thread: all tensor work of one step (one model pass, one sampling call)."""
        runner = self.runner
        runner.release(work.release_ids)
        for prefix in work.prefixes:
            wait_until_ready(prefix)
        failed: dict[str, tuple[Request, BaseException]] = {}
        if set(runner.request_ids) != set(work.decode_tokens):
            raise RuntimeError(
                f"runner rows {sorted(runner.request_ids)} != decoding {sorted(work.decode_tokens)}"
            )
        if not (work.decode_tokens or work.prefill):
            return StepResult()
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
                    failed[item.request_id] = (work.states[item.request_id], exc)
            all_logits = torch.cat(parts) if parts else torch.empty(0)
        computed = sum(
            (len(item.input_ids) if item.end is None else item.end) - item.start
            for item in work.prefill
            if item.request_id not in failed
        )
        if not ids:
            return StepResult(failed=failed, prompt_tokens=computed)
        if self.debug_logits_hook is not None:
            self.debug_logits_hook(list(ids), all_logits)
        rows: list[_Row] = [work.states[r].slot for r in ids]
        sampled: SampleOutput = self.sampler.sample(all_logits, [row.sampling for row in rows])
        scores = {  # once the last chunk of a prompt ran (its logits were kept chunk by chunk)
            item.request_id: self._prompt_scores(item, work.states[item.request_id].params.top_n_tokens)
            for item in work.prefill
            if item.prompt_logprobs and item.request_id in ids
        }
        outputs = []
        for i, rid in enumerate(ids):
            token = sampled.token_ids[i]
            rows[i].next_token = token  # fed to the model next step (the record gets it on the loop)
            outputs.append(
                TokenOutput(
                    work.states[rid], token, sampled.logprobs[i], sampled.top_tokens[i], scores.get(rid)
                )
            )
        return StepResult(outputs, failed, num_rows=len(ids), prompt_tokens=computed)

    def _prompt_scores(self, item: PrefillItem, top_n: int) -> PromptScores:
        """The prompt's logprobs (and `top_n` alternatives per position) from the runner's prompt
        logits (all None, no alternatives, if it keeps none)."""
        take = getattr(self.runner, "take_prompt_logits", None)
        logits = None if take is None else take(item.request_id)  # [P, V] or None
        if logits is None:
            return [None] * len(item.input_ids), None
        return prompt_scores(logits, item.input_ids, top_n)


def default_runner(loaded: LoadedModel, limits: Limits, options: NativeOptions) -> ModelRunner:
    model_type = loaded.spec.model_type
    if model_type == "gpt2":
        from server.engine.gpt2_runner import GPT2Runner

        budget = limits.kv_budget_bytes
        if budget is None and limits.kv_budget_tokens is not None:
            budget = limits.kv_budget_tokens * PagedKVCache.bytes_per_token(
                loaded.spec.num_layers, loaded.spec.num_heads, loaded.spec.head_dim, loaded.dtype
            )
        return GPT2Runner(
            loaded,
            limits.max_batch_size,
            budget,
            options.kv_block_size,
            cuda_graphs=options.cuda_graphs,
            torch_compile=options.torch_compile,
            static_decode=options.static_decode,
            static_prefix_arena_tokens=limits.static_prefix_arena_tokens,
            max_cuda_graphs=limits.max_cuda_graphs,
        )
    if model_type == "bart":
        from server.engine import bart_runner  # type: ignore[attr-defined]

        return bart_runner.BartRunner(  # type: ignore[no-any-return]
            loaded,
            max_rows=limits.max_batch_size,
            block_size=options.kv_block_size,
        )
    raise EngineError(f"no model runner for model_type {model_type!r}")

"""Structured output: constraints compiled to grammars (bounded, cached), and per-row token masks.

One grammar library for both backends, xgrammar. `GrammarCompiler.prepare(tenant, constraint)` turns a
request's `StructuredOutput` into a `CompiledConstraint`:

- compiled in a worker process (`grammar_worker`, through `worker_pool.WorkerPool`), never in the
  server's: a hostile schema or grammar is killed at `grammar_compile_timeout_s` and capped at
  `grammar_compile_max_memory_bytes`, one tenant holds at most all but one worker (its further
  compiles wait for its own to end), and a caller waits at most the queue timeout. The engine's callers compile inside the tenant's rate-limit lease,
  so compiles count against the tenant's concurrency. Refusals are `InvalidConstraint` (400);
- cached by the constraint (every field; the tokenizer is the engine's, one per compiler), LRU under
  `grammar_cache_bytes`, and compiled once however many requests ask at the same time; a constraint
  refused as invalid or too large is remembered too (`MAX_REFUSED`), so sending it again costs no
  worker (one that ran out of time is compiled again: that depends on the machine's load);
- the result is the constraint as one EBNF grammar (what the vLLM backend passes to vLLM's own
  xgrammar backend: both backends enforce the same grammar) and, with `token_masks` (the native
  engine), the compiled grammar for the tokenizer.

`RowGrammar` is one request's position in its grammar; `allowed_tokens` gives the sampler the tokens a
batch's constrained rows may take next, as a mask over the vocabulary (xgrammar's bitmask, unpacked).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.errors import InvalidConstraint, QueueFull, RequestFailed
from server.engine.observer import EngineObserver
from server.engine.types import StructuredOutput
from server.engine.worker_pool import PoolLimits, WorkerError, WorkerPool
from server.limits import Limits

logger = logging.getLogger(__name__)

WORKER_MODULE = "server.engine.grammar_worker"  # run, never imported here
MAX_REFUSED = 1024  # constraints remembered as refused (their messages), LRU


@dataclass
class CompiledConstraint:
    """What compiling one `StructuredOutput` gave (shared by every request that asks for it)."""

    kind: str
    ebnf: str  # the whole constraint as one grammar in xgrammar's EBNF (start rule `root`)
    nbytes: int  # what it holds in the cache
    compiled: Any = None  # xgrammar's `CompiledGrammar` for the tokenizer (native engine only)


class RowGrammar:
    """One request's matcher: which tokens may come next, advanced by each sampled token."""

    def __init__(self, constraint: CompiledConstraint) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(constraint.compiled)

    @property
    def active(self) -> bool:
        """False once the grammar ended (it accepted the stop token): the row is free again."""
        return not self.matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        if self.active and not self.matcher.accept_token(token_id):
            # Only the degenerate-row fallback of the sampler can pick a masked token (it never should).
            logger.warning("a constrained row sampled token %d, which its grammar does not allow", token_id)


def allowed_tokens(grammars: list[RowGrammar], vocab: int, device: torch.device) -> torch.Tensor:
    """[M, V] bool: the tokens each of `grammars` allows next (one bitmask fill per row on the host,
    one host->device copy)."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(
        len(grammars), vocab
    )  # [M, ceil(V / 32)] int32, bit b of word w = token 32w + b
    for i, grammar in enumerate(grammars):
        grammar.matcher.fill_next_token_bitmask(bitmask, i)
    shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
    words = bitmask.to(device, non_blocking=True)  # [M, W]
    bits = (words[:, :, None] >> shifts) & 1  # [M, W, 32]
    return bits.reshape(len(grammars), -1)[:, :vocab].bool()  # [M, V]


class GrammarCompiler:
    """See the module docstring. `token_masks`: also keep the compiled grammar (native engine)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_id: int | None,
        limits: Limits,
        observer: EngineObserver | None = None,
        token_masks: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.limits = limits
        self.observer = observer or EngineObserver()
        self.token_masks = token_masks
        self.pool = WorkerPool(
            PoolLimits(
                workers=limits.grammar_workers,
                timeout_s=limits.grammar_compile_timeout_s,
                memory_bytes=limits.grammar_compile_max_memory_bytes,
                wait_s=limits.queue_timeout_s,
            ),
            WORKER_MODULE,
            "grammar",
            "compile",
            tenant_waits=True,  # a tenant's own compiles queue behind each other; others' do not
        )
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._cache_bytes = 0
        self._compiling: dict[str, asyncio.Future[CompiledConstraint]] = {}
        self._refused: OrderedDict[str, InvalidConstraint] = OrderedDict()
        self._info: Any = None  # xgrammar's TokenizerInfo, built on the first compile
        self._info_ready = asyncio.Lock()

    async def prepare(self, tenant: str, constraint: StructuredOutput) -> CompiledConstraint:
        """The compiled constraint, from the cache or compiled now (see the module docstring)."""
        constraint.validate()
        key = constraint.key
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            self.observer.on_grammar_cache(hit=True)
            self.observer.on_structured_request(constraint.kind)
            return found
        refused = self._refused.get(key)
        if refused is not None:
            self._refused.move_to_end(key)
            raise InvalidConstraint(str(refused))
        self.observer.on_grammar_cache(hit=False)
        compiling = self._compiling.get(key)
        if compiling is None:
            compiling = asyncio.ensure_future(self._compile(tenant, constraint))
            self._compiling[key] = compiling

            def done(future: asyncio.Future[CompiledConstraint]) -> None:
                self._compiling.pop(key, None)
                if not future.cancelled():
                    future.exception()  # retrieved: its waiters may all have gone away

            compiling.add_done_callback(done)
        # Shielded: a caller that goes away does not stop a compile other callers wait for (the
        # worker's deadline bounds it, and its result is cached).
        result = await asyncio.shield(compiling)
        self.observer.on_structured_request(constraint.kind)
        return result

    async def _compile(self, tenant: str, constraint: StructuredOutput) -> CompiledConstraint:
        async with self._info_ready:
            if self.pool.init is None:
                self.pool.init = {"tokenizer_info": await asyncio.to_thread(self._tokenizer_info)}
        request = {
            "kind": constraint.kind,
            "value": constraint.value,
            "choices": list(constraint.choices),
            "disable_any_whitespace": constraint.disable_any_whitespace,
            "whitespace_pattern": constraint.whitespace_pattern,
            "masks": self.token_masks,  # vLLM needs only the grammar: no compiled bytes through the pipe
        }
        start = time.perf_counter()
        try:
            answer = await self.pool.call(tenant, request)
        except WorkerError as exc:
            self.observer.on_grammar_compile(time.perf_counter() - start, exc.reason)
            raise _refusal(exc.reason, str(exc), self.limits.grammar_compile_max_memory_bytes) from None
        outcome = str(answer.get("reason", "ok"))
        self.observer.on_grammar_compile(time.perf_counter() - start, outcome)
        if "ebnf" not in answer:
            refusal = _refusal(
                outcome, str(answer.get("error")), self.limits.grammar_compile_max_memory_bytes
            )
            if isinstance(refusal, InvalidConstraint):  # invalid or too large: the same again next time
                self._refused[constraint.key] = refusal
                while len(self._refused) > MAX_REFUSED:
                    self._refused.popitem(last=False)
            raise refusal
        logger.info(
            "compiled a %s constraint in %.3f s (compile %.3f s, %d bytes)",
            constraint.kind, time.perf_counter() - start, float(answer["seconds"]), int(answer["bytes"]),
        )  # fmt: skip
        result = CompiledConstraint(constraint.kind, str(answer["ebnf"]), len(answer["ebnf"]))
        if self.token_masks:
            result.compiled = await asyncio.to_thread(self._load, str(answer["compiled"]))
            result.nbytes = int(answer["bytes"])
        self._remember(constraint.key, result)
        return result

    def _tokenizer_info(self) -> str:
        import xgrammar as xgr

        stop = None if self.eos_token_id is None else [self.eos_token_id]
        info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=stop
        )
        self._info = info
        return str(info.serialize_json())

    def _load(self, serialized: str) -> Any:
        import xgrammar as xgr

        return xgr.CompiledGrammar.deserialize_json(serialized, self._info)

    def _remember(self, key: str, result: CompiledConstraint) -> None:
        budget = self.limits.grammar_cache_bytes
        if result.nbytes > budget:
            return  # larger than the whole cache: served, not kept
        self._cache[key] = result
        self._cache_bytes += result.nbytes
        while self._cache_bytes > budget:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.nbytes

    @property
    def cached(self) -> int:
        """Compiled constraints in the cache now."""
        return len(self._cache)

    async def close(self) -> None:
        await self.pool.close()


def _refusal(reason: str, message: str, memory_bytes: int) -> Exception:
    """A compile that failed, as the engine error its caller gets (`memory_bytes`: the compile's cap,
    named in its refusal)."""
    if reason in ("busy", "tenant"):
        return QueueFull(f"structured output: {message}")
    if reason == "unavailable":
        return RequestFailed(f"structured output: {message}")
    if reason == "timeout":
        message += " (PREFIXSERVE_GRAMMAR_COMPILE_TIMEOUT_S); simplify the constraint"
    elif reason == "memory":
        message += f" (PREFIXSERVE_GRAMMAR_COMPILE_MAX_MEMORY_BYTES={memory_bytes}); simplify the constraint"
    return InvalidConstraint(message)

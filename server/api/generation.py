"""Admission and one generation's life, shared by the TGI, native and OpenAI routes.

`start_generation` checks draining and the prompt's size (O(1), before any work proportional to it),
takes a tenant rate-limit lease, tokenises the prompt in a worker thread (never on the event loop: a
long prompt would stall every other request), submits the ids with `engine.add_request` and waits
for the *first* event before returning. `add_request` raises the admission errors that need no store
read (prompt too long, queue full...); those that do (unknown task, store down, a prefix that does not
fit) come with the first event, as does what can go wrong while the request waits (queue timeout, a
failed prefill): waiting for it turns them all into a proper HTTP status, even on streaming routes,
instead of a broken 200 stream. The returned `Generation` yields the events (first
one included), releases the lease exactly once, aborts the engine request if the client goes away
(so the engine frees its row), and records timings for the access log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Receive

from server.api.admission import left_engine_queue
from server.api.auth import Principal
from server.api.deps import AppState
from server.api.errors import ApiError, Draining
from server.api.ratelimit import Lease
from server.engine.errors import InvalidRequest, RequestFailed
from server.engine.types import GenerationRequest, SamplingParams, StreamEvent
from server.limits import Limits
from server.logging import RequestContext, engine_request_id, request_context

# Engine finish reasons that are not a completed generation (engine stopping, or a failure).
ABORTED = frozenset({"cancelled", "error"})


class ClientDisconnected(ApiError):
    """The client went away before a non-streamed generation finished (nginx's 499; nobody reads it)."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected before the generation finished", "client_disconnected")


class IncompleteGeneration(ApiError):
    """The engine ended the request without finishing it (cancelled on shutdown, or failed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(424, f"generation ended early ({reason})", "incomplete_generation")


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool
    top: list[tuple[int, float]] = field(default_factory=list)  # alternatives (id, logprob), best first


@dataclass
class Completed:
    """A whole generation, collected."""

    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_generated_tokens: int
    seed: int | None
    prefix_version: int | None
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None  # with prompt logprobs asked
    prompt_logprobs: list[float | None] | None = None
    prompt_top_tokens: list[list[tuple[int, float]]] | None = None  # with prompt logprobs and top_n

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the generated tokens' logprobs: how best_of ranks candidates (as vLLM and TGI do)."""
        return sum(t.logprob or 0.0 for t in self.tokens)


def token_info(event: StreamEvent) -> TokenInfo:
    """TGI's per-token object. EOS is the only special token we emit, and it ends the stream."""
    return TokenInfo(
        id=event.token_id if event.token_id is not None else -1,
        text=event.text,
        logprob=event.token_logprob,
        special=event.finish_reason == "eos_token",
        top=list(event.top_tokens),
    )


class Generation:
    """The events of one admitted generation; iterate once (`events()`) or `collect()`."""

    def __init__(
        self, first: StreamEvent, handle: Any, lease: Lease, ctx: RequestContext | None, start: float
    ) -> None:
        self._first: StreamEvent | None = first
        self.first_event = first  # kept (events() consumes `_first`): what the prompt's echo reads
        self._handle = handle  # the engine's `RequestHandle`
        self._lease = lease
        self._ctx = ctx
        self._start = start
        self._closed = False
        if ctx is not None:
            ctx.cleanups.append(self.close)
        self.first_token_at = time.perf_counter()
        if ctx is not None:
            ctx.ttft_s = round(self.first_token_at - start, 6)
            ctx.prompt_tokens = first.num_prompt_tokens
            ctx.prefix_version = first.prefix_version

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every event, first included; raises `IncompleteGeneration` if the engine aborted it."""
        last: StreamEvent | None = None
        try:
            event = self._first
            self._first = None
            while event is not None:
                last = event
                yield event
                if event.finish_reason is not None:
                    break
                try:
                    event = await anext(self._handle)
                except StopAsyncIteration:
                    raise RequestFailed("the engine ended the stream without a final event") from None
            if last is not None and last.finish_reason in ABORTED:
                raise IncompleteGeneration(last.finish_reason)
        finally:
            await self.close(last)

    async def collect(self) -> Completed:
        tokens: list[TokenInfo] = []
        last: StreamEvent | None = None
        prompt: StreamEvent | None = None
        async for event in self.events():
            last = event
            if event.prompt_logprobs is not None:
                prompt = event
            if event.token_id is not None:
                tokens.append(token_info(event))
        assert last is not None and last.finish_reason is not None
        text = last.generated_text if last.generated_text is not None else "".join(t.text for t in tokens)
        return Completed(
            text=text,
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_generated_tokens=last.num_generated_tokens,
            seed=last.seed,
            prefix_version=last.prefix_version,
            tokens=tokens,
            prompt_token_ids=None if prompt is None else prompt.prompt_token_ids,
            prompt_logprobs=None if prompt is None else prompt.prompt_logprobs,
            prompt_top_tokens=None if prompt is None else prompt.prompt_top_tokens,
        )

    async def collect_unless_disconnected(self, receive: Receive) -> Completed:
        """`collect()`, abandoned if the client disconnects first (see `collect_all_unless_disconnected`)."""
        return (await collect_all_unless_disconnected([self], receive))[0]

    async def close(self, last: StreamEvent | None = None) -> None:
        """Release the lease and abort the engine request (idempotent; a finished one is not affected);
        called when iteration ends or stops."""
        if self._closed:
            return
        self._closed = True
        # Shielded: on a client disconnect this runs inside a cancelled scope, and the lease must
        # still be released and the engine told to drop the request.
        with anyio.CancelScope(shield=True):
            await self._lease.release()
            self._handle.abort()  # the engine frees the request's batch row
        if self._ctx is not None:
            self._ctx.e2e_s = round(time.perf_counter() - self._start, 6)
            if last is not None:
                self._ctx.generated_tokens = last.num_generated_tokens
                self._ctx.finish_reason = last.finish_reason


# Longest token of GPT-2's byte-level BPE vocabulary, in bytes: the bound when a tokenizer has no
# readable vocabulary.
GPT2_MAX_TOKEN_BYTES = 128


def prompt_char_limit(limits: Limits, max_positions: int, tokenizer: Any) -> int:
    """`limits.max_prompt_chars`, or unset: the most characters a prompt of `max_positions` tokens can
    have, `max_positions` x the most characters one token stands for.

    For byte-level BPE (GPT-2, BART) a vocabulary entry holds one character per byte, and a prompt's
    characters are at most its UTF-8 bytes, which its tokens split: a prompt of `c` characters has at
    least `c / longest entry` tokens. Tokenizers whose tokens can stand for more text than their
    vocabulary string (e.g. an unknown-word token) need `PREFIXSERVE_MAX_PROMPT_CHARS` set.
    """
    if limits.max_prompt_chars is not None:
        return limits.max_prompt_chars
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if get_vocab is not None else {}
    return max_positions * max((len(token) for token in vocab), default=GPT2_MAX_TOKEN_BYTES)


def check_prompt_size(state: AppState, prompt: str | list[int]) -> None:
    """422 for a prompt that cannot fit the model, decided in O(1) before any work proportional to it.

    A prompt of more characters than `max_prompt_chars` (positions x the longest token, see
    `prompt_char_limit`) has more tokens than the model has positions; a list of more ids does too.
    """
    max_positions = state.spec.max_positions
    if isinstance(prompt, str) and len(prompt) > state.max_prompt_chars:
        raise InvalidRequest(
            f"prompt has {len(prompt)} characters; at most {state.max_prompt_chars} can fit the "
            f"model's {max_positions} positions"
        )
    if isinstance(prompt, list) and len(prompt) > max_positions:
        raise InvalidRequest(f"prompt has {len(prompt)} tokens; the model has {max_positions} positions")


async def start_generation(
    state: AppState,
    principal: Principal,
    task: str | None,
    prompt: str | list[int],
    params: SamplingParams,
    request_id: str,
    lease: Lease | None = None,
) -> Generation:
    """Admit and submit one request; returns once its first event is there (see module docstring).
    `lease`: the tenant's rate-limit lease when the route took it before earlier work (chat's render)."""
    start = time.perf_counter()
    ctx = request_context.get()
    if ctx is not None:
        ctx.task = task
    try:
        if state.draining:
            raise Draining()
        params.validate()  # out-of-range values → 422 before using a rate-limit slot
        check_prompt_size(state, prompt)
    except BaseException:
        if lease is not None:
            await lease.release()
        raise
    if lease is None:
        lease = await state.limiter.acquire(principal.tenant)
    handle: Any = None
    try:
        if isinstance(prompt, str):  # tokenising takes time proportional to the prompt: not on the loop
            prompt = await anyio.to_thread.run_sync(state.engine.tokenize, prompt)
        request = GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            params=params,
            tenant=principal.tenant,
            task=task,
            priority=principal.priority,
            # A traffic split pins by the client's key, else by the (client-visible) request id.
            route_key=principal.route_key or (ctx.request_id if ctx is not None else request_id),
        )
        try:
            handle = await state.engine.add_request(request)
        finally:
            left_engine_queue()  # queued (or refused): no longer counted by admission's burst check
        first = await anext(handle)
    except BaseException:
        await lease.release()
        if handle is not None:
            handle.abort()
        raise
    # Counted once accepted: unknown task names (typos, probes) never take a metrics label slot.
    state.metrics.observe_task_request(principal.tenant, task)
    state.metrics.observe_variant(principal.tenant, task, first.prefix_variant)
    if ctx is not None and first.prefix_variant is not None:
        ctx.extra["prefix_variant"] = first.prefix_variant
    return Generation(first, handle, lease, ctx, start)


async def collect_all_unless_disconnected(generations: list[Generation], receive: Receive) -> list[Completed]:
    """Every generation's `collect()`, abandoned if the client disconnects first: the engine requests
    are aborted and the leases released at once, instead of generating tokens for nobody.

    `receive` is the request's ASGI receive; its body has been read, so the next message it returns
    is `http.disconnect` (when the client goes away, or once the response is sent).
    """
    outcome: list[list[Completed] | Exception] = []
    async with anyio.create_task_group() as group:

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch_disconnect)
        try:
            outcome.append(list(await asyncio.gather(*(g.collect() for g in generations))))
        except Exception as exc:  # re-raised below, not wrapped in the task group's ExceptionGroup
            outcome.append(exc)
        group.cancel_scope.cancel()
    if not outcome:
        for generation in generations:
            await generation.close()
        raise ClientDisconnected()
    if isinstance(outcome[0], Exception):
        for generation in generations:
            await generation.close()
        raise outcome[0]
    return outcome[0]


def sequence_ids(count: int) -> list[str]:
    """Engine request ids for the `count` sequences of one HTTP request (the first is the request's)."""
    base = engine_request_id()
    return [base] + [f"{base}-{i}" for i in range(1, count)]


async def start_generations(
    state: AppState,
    principal: Principal,
    task: str | None,
    prompts: list[str | list[int]],
    params: list[SamplingParams],
    request_ids: list[str],
    lease: Lease | None = None,
) -> list[Generation]:
    """`start_generation` for each (prompt, params) pair concurrently (n / best_of: one engine request
    per sequence, several prompts: one per prompt and sequence, all sharing the task's prefix); if one
    is refused, the others are closed. `lease`, if given, is the first sequence's."""
    results = await asyncio.gather(
        *(
            start_generation(state, principal, task, prompt, p, r, lease if i == 0 else None)
            for i, (prompt, p, r) in enumerate(zip(prompts, params, request_ids, strict=True))
        ),
        return_exceptions=True,
    )
    started = [r for r in results if isinstance(r, Generation)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for generation in started:
            await generation.close()
        raise failures[0]
    return started


async def interleave(generations: list[Generation]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of several generations as they come, each with its generation's index."""
    if len(generations) == 1:  # the common case: no tasks, no queue
        async for event in generations[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    pumps = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(generations)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        for generation in generations:
            await generation.close()

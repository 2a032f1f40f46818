"""Tokenizer routes: TGI's and vLLM's `POST /tokenize`, vLLM's `POST /detokenize`, `GET /version`.

`/tokenize` takes either TGI's body `{"inputs"}` (answer: a list of `{id, text, start, stop}`) or
vLLM's `{"prompt", "model"?}` (answer: `{tokens, count, max_model_len}`, the length net of the task's
prefix). Both need a key: `model`/`adapter_id` name the caller's tasks. Tokenizer work is admitted as
generation is (key first, the queue's refusal before the body, the tenant's limits, a size bound)
and done off the event loop, answer included.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Response

from server.api.auth import Principal
from server.api.deps import AppState, Caller, State
from server.api.errors import ApiError, error_responses
from server.api.openai_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    VersionResponse,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
)
from server.api.ratelimit import Lease
from server.api.routes.openai import model_task
from server.api.schemas import TokenizeRequest, TokenSpan, valid_unicode
from server.api.tokens import (
    check_fields,
    encode,
    in_thread,
    prefix_positions,
    tokenizer,
    tokenizer_routes_thread,
)
from server.api.version import __version__

router = APIRouter(tags=["tokenize"])


def tokenize_char_limit(state: AppState) -> int:
    """`max_tokenize_chars`, or unset: the prompt limit (a longer text cannot be a prompt either)."""
    return state.config.limits.max_tokenize_chars or state.max_prompt_chars


async def _tenant_work(state: AppState, caller: Principal, text_chars: int, what: str) -> Lease:
    """Tokenizer work is the tenant's work: size-checked first (O(1)), then counted against the
    tenant's concurrency and rate limits (admission has checked the queue before the body)."""
    limit = tokenize_char_limit(state)
    if text_chars > limit:
        raise ApiError(422, f"{what} has {text_chars} characters; at most {limit}", "validation")
    return await state.limiter.acquire(caller.tenant)


def _spans(state: AppState, text: str) -> bytes:
    """TGI's answer, built and serialised off the event loop (it is proportional to the text)."""
    encoded = tokenizer(state)(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = [
        {"id": i, "text": text[start:stop], "start": start, "stop": stop}
        for i, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return json.dumps(spans, separators=(",", ":")).encode()


@router.post(
    "/tokenize",
    response_model=list[TokenSpan] | VllmTokenizeResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
)
async def tokenize(state: State, caller: Caller, body: TokenizeRequest | VllmTokenizeRequest) -> Any:
    """Tokens of a prompt as the engine sees it (TGI's or vLLM's shape, by the body's fields). Inputs
    longer than `max_tokenize_chars` get 422; the work counts against the tenant's limits."""
    check_fields(body, "/tokenize", strict=False)
    text = body.inputs if isinstance(body, TokenizeRequest) else body.prompt
    try:
        valid_unicode(text, "input")
    except ValueError as exc:
        raise ApiError(422, str(exc), "validation") from None
    lease = await _tenant_work(state, caller, len(text), "input")
    try:
        thread = tokenizer_routes_thread(state)
        if isinstance(body, TokenizeRequest):
            return Response(
                await in_thread(_spans, state, text, limiter=thread), media_type="application/json"
            )
        ids = await in_thread(encode, state, text, limiter=thread)
        task = None if body.model is None else model_task(state, body.model)
        taken = await prefix_positions(state, caller.tenant, task)
    finally:
        await lease.release()
    return VllmTokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.spec.max_positions - taken)


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 413, 422, 429)
)
async def detokenize(state: State, caller: Caller, body: DetokenizeRequest) -> DetokenizeResponse:
    """vLLM's detokenize: token ids back to text (422 for ids outside the vocabulary, or for more ids
    than the model has positions: no prompt or output is longer)."""
    check_fields(body, "/detokenize", strict=False)
    positions = state.spec.max_positions
    if len(body.tokens) > positions:
        raise ApiError(
            422, f"{len(body.tokens)} token ids; at most {positions} (the model's positions)", "validation"
        )
    vocab = state.spec.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(422, f"token ids must be in [0, {vocab}), got {bad[:5]}", "validation")
    lease = await state.limiter.acquire(caller.tenant)
    try:
        decode = tokenizer(state).decode
        text = await in_thread(decode, body.tokens, limiter=tokenizer_routes_thread(state))
        return DetokenizeResponse(prompt=str(text))
    finally:
        await lease.release()


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """vLLM's version route: this server's version."""
    return VersionResponse(version=__version__)

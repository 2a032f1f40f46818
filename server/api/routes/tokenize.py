"""Tokenizer routes: TGI's and vLLM's `POST /tokenize`, vLLM's `POST /detokenize`, `GET /version`.

`/tokenize` takes either TGI's body `{"inputs"}` (answer: a list of `{id, text, start, stop}`) or
vLLM's `{"prompt", "model"?}` (answer: `{tokens, count, max_model_len}`, the length net of the task's
prefix). Both need a key: `model`/`adapter_id` name the caller's tasks.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.api.deps import Caller, State
from server.api.errors import ApiError, error_responses
from server.api.openai_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    VersionResponse,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
)
from server.api.routes.openai import model_task
from server.api.schemas import TokenizeRequest, TokenSpan
from server.api.tokens import check_fields, encode, in_thread, prefix_positions, tokenizer
from server.api.version import __version__

router = APIRouter(tags=["tokenize"])


@router.post(
    "/tokenize",
    response_model=list[TokenSpan] | VllmTokenizeResponse,
    responses=error_responses(400, 401, 404, 413, 422, 503),
)
async def tokenize(state: State, caller: Caller, body: TokenizeRequest | VllmTokenizeRequest) -> Any:
    """Tokens of a prompt as the engine sees it (TGI's or vLLM's shape, by the body's fields)."""
    check_fields(body, "/tokenize", strict=False)
    if isinstance(body, TokenizeRequest):
        encoded = await in_thread(
            lambda: tokenizer(state)(body.inputs, return_offsets_mapping=True, add_special_tokens=False)
        )
        return [
            TokenSpan(id=i, text=body.inputs[start:stop], start=start, stop=stop)
            for i, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]
    ids = await in_thread(encode, state, body.prompt)
    task = None if body.model is None else model_task(state, body.model)
    taken = await prefix_positions(state, caller.tenant, task)
    return VllmTokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.spec.max_positions - taken)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 413, 422))
async def detokenize(state: State, caller: Caller, body: DetokenizeRequest) -> DetokenizeResponse:
    """vLLM's detokenize: token ids back to text (422 for ids outside the vocabulary)."""
    check_fields(body, "/detokenize", strict=False)
    vocab = state.spec.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(422, f"token ids must be in [0, {vocab}), got {bad[:5]}", "validation")
    return DetokenizeResponse(prompt=str(await in_thread(tokenizer(state).decode, body.tokens)))


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """vLLM's version route: this server's version."""
    return VersionResponse(version=__version__)

"""Tokenizer and task-length helpers the compatibility routes share (tokenize, logprobs' token texts,
prompt truncation, the positions a task's prefix takes)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from pydantic import BaseModel

from prefix_store.base import validate_name
from server.api.deps import AppState
from server.api.errors import ApiError
from server.api.prefix_admin import store_call
from server.api.schemas import unknown_fields

logger = logging.getLogger(__name__)


def tokenizer(state: AppState) -> Any:
    """The engine's tokenizer (the API never loads a model or tokenizer of its own)."""
    return state.engine.tokenizer


def token_text(state: AppState, token_id: int) -> str:
    """One token's text as TGI and vLLM report it (the decoded token, possibly a partial character)."""
    return str(tokenizer(state).decode([token_id]))


def encode(state: AppState, text: str) -> list[int]:
    return list(tokenizer(state).encode(text, add_special_tokens=False))


async def in_thread(func: Any, *args: Any, limiter: anyio.CapacityLimiter | None = None) -> Any:
    """Tokenizer work takes time proportional to the text: never on the event loop (`limiter`: the
    threads it may take, anyio's default pool otherwise)."""
    return await anyio.to_thread.run_sync(func, *args, limiter=limiter)


def tokenizer_routes_thread(state: AppState) -> anyio.CapacityLimiter:
    """The one worker thread of the tokenizer routes' work. Their answers are built in Python (a span
    per token of inputs up to a MiB), which holds the GIL: run side by side, a burst of them would take
    the interpreter from the event loop, and `/health` and every stream with it. One at a time, the
    loop keeps its share; requests beyond it wait (their tenant's concurrency still counts them)."""
    if state.tokenizer_thread is None:
        state.tokenizer_thread = anyio.CapacityLimiter(1)
    limiter: anyio.CapacityLimiter = state.tokenizer_thread
    return limiter


async def truncate_prompt(state: AppState, text: str, keep: int | None) -> str | list[int]:
    """TGI's `truncate`: keep the last `keep` prompt tokens (token ids then go to the engine)."""
    if keep is None:
        return text
    ids: list[int] = await in_thread(encode, state, text)
    return ids[-keep:] if len(ids) > keep else text


async def prefix_positions(state: AppState, tenant: str, task: str | None) -> int:
    """Decoder positions the task's current prefix takes (0 for the bare model or an encoder-decoder,
    whose prompt goes to the encoder). Unknown tasks are a 404 (via the store's error)."""
    if task is None or state.spec.kind != "decoder-only":
        return 0
    with store_call(state, "describe"):
        info = await state.store.describe(tenant, validate_name(task, "task"))
    return int((info.current.metadata.get("prefix_lengths") or {}).get("decoder", 0))


def check_fields(body: BaseModel, route: str, strict: bool) -> None:
    """Fields no API defines: a 422 on our native routes (`strict`), else a warning in the log
    (vLLM's behaviour) and they are ignored."""
    names = unknown_fields(body)
    if not names:
        return
    if strict:
        raise ApiError(422, f"unknown field(s): {', '.join(names)}", "validation")
    logger.warning("ignoring unknown request fields", extra={"route": route, "fields": names})

"""One request's state and its endings, alike on both engine backends (ours and vLLM's).

`RequestState` holds what every backend keeps per request (the caller's events, the detokenizer, the
prefix it was served with); each backend adds its own fields. `RequestEndings` is how a request's
stream ends from outside the model (cancelled) or with an error, and what its events and finish metric
carry: a backend supplies `observer` and `_end` (what leaving means to its scheduler and model).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import InvalidRequest
from server.engine.handle import RequestHandle
from server.engine.observer import EngineObserver
from server.engine.prefix_cache import ResolvedPrefix
from server.engine.types import FinishReason, GenerationRequest, StreamEvent


@dataclass(kw_only=True)
class RequestState:
    """Engine-side state of one request (event loop only)."""

    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    detok: IncrementalDetokenizer
    arrival: float
    prefix: ResolvedPrefix | None = None  # None until located
    events: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    handle: RequestHandle | None = None  # the caller's side, made at admission
    last_token_time: float | None = None
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def task_label(self) -> str:
        return f"{self.request.tenant}/{self.request.task}" if self.request.task else ""


class RequestEndings:
    """See the module docstring."""

    observer: EngineObserver

    def _end(self, state: Any, reason: Any) -> None:  # the backend's: leave its scheduler and model
        raise NotImplementedError

    def _finish_outside(self, state: RequestState, reason: FinishReason) -> None:
        """End a request for a reason outside the model (cancelled): its last event, then it leaves."""
        if state.done:
            return
        self._end(state, "aborted")
        text = state.detok.finish(reason)
        state.events.put_nowait(self._event(state, None, text, reason))
        self._observe_finish(state, reason)

    def _fail(self, state: RequestState, exc: BaseException, observe: bool = True) -> None:
        """End the request with `exc` (its handle raises it). `observe=False`: a refusal at admission
        (unknown task, store down, ...), which the metrics do not count as a finished request."""
        if state.done:
            return
        self._end(state, "failed")
        state.events.put_nowait(exc)
        if observe:
            self._observe_finish(state, "error")

    def _event(
        self,
        state: RequestState,
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
            num_prompt_tokens=len(state.prompt_ids),
            num_generated_tokens=state.detok.num_generated,
            seed=state.seed,
            prefix_version=None if state.prefix is None else state.prefix.version,
            prefix_variant=None if state.prefix is None else state.prefix.variant,
            generated_text=state.detok.text if reason is not None else None,
            token_logprob=logprob,
        )

    def _observe_finish(self, state: RequestState, reason: str) -> None:
        self.observer.on_finish(
            reason,
            len(state.prompt_ids),
            state.detok.num_generated,
            time.monotonic() - state.arrival,
            state.request.tenant,
            state.request.task,
        )


def tokenize_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """The prompt's token ids: a text is encoded, ids are checked against the text vocabulary; an empty
    prompt starts from the BOS token, like HF generate without input. Safe in worker threads."""
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    else:
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
    if not ids:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise InvalidRequest("the prompt is empty and the model has no BOS token")
        ids = [int(bos)]
    return ids


def failure_note(failure: BaseException | None) -> str:
    return "" if failure is None else f" (engine failed: {failure!r})"

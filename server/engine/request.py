"""One request's record, from admission to its last event: the one place its state lives.

The front end (`frontend.py`) makes it at admission and every part above and beside the model reads
it: the scheduler queues and admits it (it is the scheduler's entry: `Schedulable`), the detokenizer
and the sampler's penalties read its token ids, and the backend keeps what only it needs in `slot`
(our engine: the row's sampling state and the token to feed next; vLLM's: its table rows and the task
streaming it through vLLM). Its token ids are held once: `token_ids` is the prompt followed by what was
generated, appended in one place (`detok.add_token`); the views (`prompt_ids`, `num_generated_tokens`)
are derived from it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import InvalidRequest
from server.engine.grammar import CompiledConstraint
from server.engine.handle import RequestHandle
from server.engine.prefix_cache import ResolvedPrefix
from server.engine.types import GenerationRequest, SamplingParams, StreamEvent


@dataclass(eq=False, kw_only=True)
class Request:
    """See the module docstring. Event-loop only."""

    request: GenerationRequest  # what the caller asked (parameters, tenant, task, priority, route key)
    token_ids: list[int]  # prompt + generated (the detokenizer appends; the sampler's penalties read)
    num_prompt_tokens: int
    seed: int
    arrival: float  # monotonic clock at admission (queue time, TTFT and e2e latency count from it)
    detok: IncrementalDetokenizer  # over `token_ids`, the same list
    reserved_tokens: int  # KV positions it holds while running: prefix + prompt + max_new_tokens
    prefix: ResolvedPrefix | None = None  # None until located (and for bare-model requests)
    events: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    handle: RequestHandle | None = None  # the caller's side, made at admission
    last_token_time: float | None = None
    done: bool = False  # over for its caller (finished, cancelled or failed)
    # The scheduler's fields (`scheduler.Schedulable`): prompt tokens computed so far, and whether its
    # prefix is where the backend reads it (requests wait in the queue until it is).
    num_computed_tokens: int = 0
    prefix_ready: bool = True
    grammar: CompiledConstraint | None = None  # structured output: its compiled constraint
    slot: Any = None  # the backend's own state of this request

    # ---- views ------------------------------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def priority(self) -> str:
        return self.request.priority

    @property
    def cost(self) -> int:
        """What it costs its tenant's fair share: the decode steps it may take."""
        return self.request.params.max_new_tokens

    @property
    def arrival_time(self) -> float:
        return self.arrival

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def task_label(self) -> str:
        return f"{self.request.tenant}/{self.request.task}" if self.request.task else ""

    @property
    def prefix_key(self) -> tuple[str, str, int] | None:
        """(tenant, task, version) of the prefix it is served with, once located."""
        if self.prefix is None or self.request.task is None:
            return None
        return (self.request.tenant, self.request.task, self.prefix.version)


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

"""The boundary between the engine front end and a model backend (`ModelBackend`).

The front end (`frontend.py`) is the engine every caller sees: admission and validation, tokenising
once, the fair queue and its scheduler, the prefix store's host tier and traffic splits, the
detokenizer and stop conditions (the one place a request's end is decided), events and metrics. A
backend supplies what only it can do: place a task's prefix where its model reads it (our engine: the
prefix cache's device tier; vLLM: rows of the prefix table inside vLLM's model), run the requests the
scheduler admitted and report their tokens, and say what its memory holds.

The loop is vLLM v1's: `plan = scheduler.schedule()` -> `result = await backend.step(plan)` -> the
front end applies `result` (tokens into events, finishes into `scheduler.update`). Our engine's step is
one model pass over the plan's rows; vLLM's is the tokens vLLM streamed since the last one (vLLM's own
scheduler batches what ours admitted; see docs/architecture.md for which decides what).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine.fair_queue import FairQueueConfig
from server.engine.prefix_cache import ResolvedPrefix
from server.engine.request import Request
from server.engine.scheduler import SchedulerConfig, SchedulerPlan
from server.engine.types import FinishReason
from server.limits import Limits

PromptScores = tuple[list[float | None], list[list[tuple[int, float]]] | None]  # logprobs, top-n per position


@dataclass
class TokenOutput:
    """One token a request produced in a step (or, with `token_id` None, the model ending it first)."""

    request: Request  # the record itself: a result never reaches a newer request under a reused id
    token_id: int | None
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    prompt_scores: PromptScores | None = None  # with the first token, when the request asked
    model_finish: FinishReason | None = None  # token_id None: why the model stopped it


@dataclass
class StepResult:
    outputs: list[TokenOutput] = field(default_factory=list)
    failed: dict[str, tuple[Request, BaseException]] = field(default_factory=dict)  # failed alone
    # Our engine's step statistics (the front end reports them); vLLM reports its own per engine step.
    num_rows: int = 0
    prompt_tokens: int = 0  # prompt positions computed


class EngineDead(Exception):
    """Raised by `step`/`check_alive` when the model can no longer run anything (e.g. vLLM's engine
    core process died): every request fails with `EngineStopped`."""


class ModelBackend(Protocol):
    """See the module docstring. Event loop only, but for what a backend runs in its own threads."""

    name: str  # "native" | "vllm"
    vocab_size: int  # text vocabulary: prompt ids and logit_bias are below it
    eos_token_id: int | None
    health_check_s: float | None  # how often an idle engine calls `check_alive` (None: never)

    def scheduler_config(self, limits: Limits, fair_queue: FairQueueConfig) -> SchedulerConfig:
        """Its scheduler's limits (our engine: rows, prefill chunks, KV budget; vLLM: rows only)."""
        ...

    def check_lengths(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> None:
        """Raise `PromptTooLong` if prompt + new tokens (+ the prefix, once known) cannot fit."""
        ...

    def reserved_tokens(self, num_prompt: int, max_new_tokens: int, prefix: ResolvedPrefix | None) -> int:
        """The KV positions the request holds while it runs (the scheduler's budget unit)."""
        ...

    def new_slot(self, request: Request) -> Any:
        """Its own state of a newly admitted request (kept on the record as `slot`)."""
        ...

    async def start(self, observer: Any, running_tasks: Callable[[], int]) -> None: ...

    async def stop(self) -> None: ...

    async def place_prefix(self, request: Request) -> None:
        """Make the request's located prefix readable by the model (may wait; raises to fail it)."""
        ...

    async def step(
        self, plan: SchedulerPlan, requests: dict[str, Request], wake: asyncio.Event
    ) -> StepResult:
        """Run the plan: our engine runs one model pass; vLLM hands it the newly admitted requests and
        returns the tokens it streamed since, waiting for some (or for `wake`) if there are none."""
        ...

    def release(self, request: Request) -> None:
        """The request left (finished, cancelled, failed, timed out): stop running it, free its rows."""
        ...

    def check_alive(self) -> None:
        """Raise `EngineDead` if the model can no longer run."""
        ...

    def kv_usage_ratio(self) -> float | None:
        """Its KV cache's usage (None: the scheduler's reservations are the usage)."""
        ...

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]: ...

    def device_prefix_bytes(self) -> int | None:
        """Bytes of prefixes where the model reads them (None: the prefix cache's device tier)."""
        ...

    def resident_prefixes(self) -> list[tuple[str, str]] | None:
        """(tenant, task) of the prefixes the model can read now (None: the device tier's)."""
        ...

    def resident_prefix_capacity(self, max_prefix_length: int) -> int | None:
        """Prefixes of `max_prefix_length` it holds (None: the device tier's budget decides)."""
        ...

    async def warm(self, request_key: tuple[str, str, int], found: ResolvedPrefix) -> bool:
        """Place a located prefix without a request, where that costs no other prefix its place."""
        ...

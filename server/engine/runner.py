"""The model-runner protocol: what the engine needs from a model family (GPT-2 here, BART elsewhere).

A runner owns the device state of the batch (its KV cache rows, and for encoder-decoder models the
encoder outputs) and runs the forward passes. The engine only speaks in request ids and token ids:

    step(tokens, items)  one pass: a token for each decoding row (`{request id: token}`) and a prompt
                     chunk for each item (`[start, end)`; a new row when start == 0). Returns the
                     request ids whose next-token logits it computed (decoding rows, then items whose
                     chunk ended their prompt) and those logits. On error it changes nothing.
    prefill(items)   whole prompts of new requests; logits of their last prompt position.
    decode(tokens)   one token per decoding row, in `request_ids` order; returns next-token logits.
    release(ids)     requests leave; their rows are freed at once.

Runners with `supports_chunked_prefill` take any chunking of a prompt (GPT-2); the others (BART,
whose prompt goes to the encoder) take whole prompts only. `kv_capacity_tokens` is the runner's own
KV budget in the unit of `reserved_tokens` (None: the engine derives one from its config).

Rows are an implementation detail of the runner (packed slots for GPT-2); the engine never needs them,
which is why this protocol talks in request ids rather than the row indices of the first design: a
BART runner keeps per-row encoder state that must move together with the decoder cache.

Length rules differ per family (GPT-2: prefix, prompt and output share one position table; BART: the
prompt goes to the encoder), so the runner checks them (`validate_lengths`) and says how many KV
positions a request reserves (`reserved_tokens`, the scheduler's KV budget unit).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from prefix_store.artifact import PrefixArtifact


@dataclass
class PrefillItem:
    """A request joining the batch: its prompt ids and its task's prefix (None = the bare model)."""

    request_id: str
    input_ids: list[int]  # the whole prompt
    prefix: PrefixArtifact | None = None  # tensors already on the runner's device and dtype
    # Rows with equal keys share one copy of the prefix: the engine passes (tenant, task, version).
    prefix_key: Hashable | None = None
    start: int = 0  # prompt tokens already computed (chunked prefill)
    end: int | None = None  # compute prompt tokens [start, end); None: to the end of the prompt
    # Keep the logits of every prompt position for `take_prompt_logits` (prompt logprobs). Optional
    # for runners: one without `take_prompt_logits` reports no prompt logprobs.
    prompt_logprobs: bool = False


@runtime_checkable
class ModelRunner(Protocol):
    """See the module docstring. Not thread-safe: the engine calls it from one worker thread."""

    max_positions: int  # the model's position limit (GPT-2: n_positions)
    vocab_size: int
    eos_token_id: int | None
    supports_chunked_prefill: bool

    @property
    def kv_capacity_tokens(self) -> int | None:
        """The runner's KV budget in `reserved_tokens` units (None: the engine's config decides)."""
        ...

    def prefix_positions(self, artifact: PrefixArtifact | None) -> int:
        """How many decoder cache positions the prefix takes (GPT-2: the decoder prefix length L)."""
        ...

    def validate_lengths(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> None:
        """Raise `PromptTooLong` (naming the numbers) when the request cannot fit the model."""
        ...

    def reserved_tokens(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> int:
        """KV positions the request holds at most while running (for the scheduler's KV budget)."""
        ...

    @property
    def request_ids(self) -> list[str]:
        """Active requests in row order: `decode`'s inputs and outputs follow this order."""
        ...

    def step(self, decode_tokens: dict[str, int], items: list[PrefillItem]) -> tuple[list[str], torch.Tensor]:
        """One pass over decoding rows and prefill chunks. Returns (request ids, logits `[n, V]`)."""
        ...

    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Add rows for `items` and run their prompts. Returns logits `[len(items), V]` (float32)."""
        ...

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row (`token_ids: [N]`, N == len(request_ids)); logits `[N, V]`."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """Free the rows of requests that left (finished, aborted, failed). Unknown ids are ignored."""
        ...

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """Cache occupancy for metrics: rows, capacity, bytes (and peaks where tracked)."""
        ...


def decode_with_step(runner: ModelRunner, token_ids: torch.Tensor) -> torch.Tensor:
    """`decode` through `step`: `token_ids: [N]`, one per decoding row in `request_ids` order -> logits [N, V]."""
    order = runner.request_ids
    if token_ids.shape != (len(order),):
        raise ValueError(
            f"decode expects {len(order)} token ids (one per decoding row), got {tuple(token_ids.shape)}"
        )
    _, logits = runner.step(dict(zip(order, token_ids.tolist(), strict=True)), [])
    return logits

"""The model-runner protocol: what the engine needs from a model family (GPT-2 here, BART elsewhere).

A runner owns the device state of the batch (its KV cache rows, and for encoder-decoder models the
encoder outputs) and runs the forward passes. The engine only speaks in request ids and token ids:

    prefill(items)   new requests join: write each one's prefix, run its prompt, return the logits of
                     the last prompt position. Rows are appended in `items` order.
    decode(tokens)   one token per active row, in `request_ids` order; returns next-token logits.
    release(ids)     requests leave; their rows are freed at once (others may move rows).

Rows are an implementation detail of the runner (packed slots for GPT-2); the engine never needs them,
which is why this protocol talks in request ids rather than the row indices of the first design: a
BART runner keeps per-row encoder state that must move together with the decoder cache.

Length rules differ per family (GPT-2: prefix, prompt and output share one position table; BART: the
prompt goes to the encoder), so the runner checks them (`validate_lengths`) and says how many KV
positions a request reserves (`reserved_tokens`, the scheduler's KV budget unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from prefix_store.artifact import PrefixArtifact


@dataclass
class PrefillItem:
    """A request joining the batch: its prompt ids and its task's prefix (None = the bare model)."""

    request_id: str
    input_ids: list[int]
    prefix: PrefixArtifact | None = None  # tensors already on the runner's device and dtype
    # Keep the logits of every prompt position for `take_prompt_logits` (prompt logprobs). Optional
    # for runners: one without `take_prompt_logits` reports no prompt logprobs.
    prompt_logprobs: bool = False


@runtime_checkable
class ModelRunner(Protocol):
    """See the module docstring. Not thread-safe: the engine calls it from one worker thread."""

    max_positions: int  # the model's position limit (GPT-2: n_positions)
    vocab_size: int
    eos_token_id: int | None

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

    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Add rows for `items` and run their prompts. Returns logits `[len(items), V]` (float32)."""
        ...

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row (`token_ids: [N]`, N == len(request_ids)); logits `[N, V]`."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """Free the rows of requests that left (finished, aborted, failed). Unknown ids are ignored."""
        ...

"""What the GPT-2 step's helpers read of the runner: `GPT2Parts`, a protocol `gpt2_runner.GPT2Runner`
satisfies. `step_inputs`, `static_decode` and `cuda_graphs` build and run the runner's step; typing them
against this (not the runner's class) keeps the runner their one importer, with no import circle."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from server.engine.paged_kv import PagedKVCache


class GPT2Parts(Protocol):
    device: torch.device
    dtype: torch.dtype
    attention_dtype: torch.dtype  # softmax and prefix scores run in it (float32 for half dtypes)
    model: Any  # the HF GPT2LMHeadModel (frozen, eval)
    blocks: Any  # its transformer blocks (`modeling.gpt2.blocks`)
    scales: Any  # per-layer attention scales (`modeling.gpt2.layer_scales`)
    fused_gelu: Any  # one fused tanh-GELU kernel, or None
    num_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    max_rows: int
    vocab_size: int
    cache: PagedKVCache
    prefix_layout: Any  # how the step lays out its rows' prefixes (`prefix_layout.py`)

    def grouped(self, request_ids: list[str]) -> list[str]:
        """`request_ids` ordered so rows of one prefix are contiguous."""
        ...

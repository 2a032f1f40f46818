"""A device arena holding the decoding rows' prefixes at fixed positions, for the static decode step.

The paged cache keeps each (task, version)'s prefix as its own tensor (`PrefixPool`), so the eager step
reads a Python list of them: its shapes and addresses change with the batch, which a CUDA graph cannot
replay. The static step instead reads one preallocated tensor pair:

    arena.keys, arena.values: [num_layers, H, capacity, D]   zero-initialised, never reallocated

where each prefix in use occupies a contiguous span [lo, hi) of positions (copied in once, when a
decoding row first needs it). A row then names its prefix by two integers, so the whole step's inputs
are fixed-size integer tensors. Spans are handed out first-fit from the low end, so the arena's
high-water mark (`width`, what a step reads) stays near the sum of the prefixes in use.

An entry lives as long as the `PrefixPool` holds its key with the same tensor: when the last row of a
(task, version) leaves, the pool drops the key and the next `place` frees the span. Holding the tensor
in the entry keeps its `id` from being reused by another prefix meanwhile. Positions of freed spans keep
old (finite) values; rows mask everything outside their own span, so they are never read into a result.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from server.engine.paged_kv import PrefixPool


@dataclass
class _Span:
    lo: int
    hi: int
    kv: torch.Tensor  # [num_layers, 2, H, L, D]: the pool's tensor the span was copied from


class PrefixArena:
    """Fixed-address storage for the prefixes of decoding rows (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_heads, capacity, head_dim)
        # zeros, not empty: masked positions still meet a matmul (0 * NaN would poison a row)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, H, capacity, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [layers, H, capacity, D]
        self.capacity = capacity
        self._spans: dict[Hashable, _Span] = {}

    @property
    def width(self) -> int:
        """Positions a step must read: the end of the highest span in use."""
        return max((s.hi for s in self._spans.values()), default=0)

    @property
    def keys_in_use(self) -> list[Hashable]:
        return list(self._spans)

    @torch.inference_mode()
    def place(self, wanted: list[Hashable], pool: PrefixPool) -> dict[Hashable, tuple[int, int]] | None:
        """Spans [lo, hi) of the `wanted` prefix keys (copying in the missing ones); None if they do not fit.

        Spans whose key left `pool` (or now maps to another tensor) are freed first.
        """
        for key in [k for k, s in self._spans.items() if pool.refs(k) == 0 or pool.get(k) is not s.kv]:
            del self._spans[key]
        for key in wanted:
            if key in self._spans:
                continue
            kv = pool.get(key)  # [layers, 2, H, L, D]
            lo = self._first_fit(int(kv.shape[3]))
            if lo is None:
                return None
            hi = lo + int(kv.shape[3])
            self.keys[:, :, lo:hi].copy_(kv[:, 0])
            self.values[:, :, lo:hi].copy_(kv[:, 1])
            self._spans[key] = _Span(lo, hi, kv)
        return {key: (self._spans[key].lo, self._spans[key].hi) for key in wanted}

    def _first_fit(self, length: int) -> int | None:
        start = 0
        for span in sorted(self._spans.values(), key=lambda s: s.lo):
            if span.lo - start >= length:
                return start
            start = span.hi
        return start if self.capacity - start >= length else None

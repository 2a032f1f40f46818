"""Slot KV cache for decoder self-attention: one row per running request, rows packed at the front.

Layout rule (the one rule every runner and test relies on):

    keys, values: [num_layers, row_capacity, H, position_capacity, D]

    row r (0 <= r < num_active) of request q, with prefix length L (0 without a prefix),
    P prompt tokens and G tokens fed back so far (lengths[r] = L + P + G):

        cache index  0 .. L-1         the task's prefix keys/values (copied once, at prefill)
        cache index  L .. L+P-1       the prompt's keys/values
        cache index  L+P .. L+P+G-1   the generated tokens' keys/values (the newest sampled token
                                      is not in the cache yet: it is the next decode step's input)
        cache index  >= lengths[r]    padding: stale or zero, never read (masked out)

    The token at cache index i has position id i, so real tokens start at position L, as in the
    prefix-tuning paper and PEFT. Attention of row r may read indices < lengths[r] (plus causality
    within a prefill); everything else is masked. Rows >= num_active are unused.

Rows are packed in [0, num_active) so a step attends over the view `keys[layer, :N, :, :S]` with no
gather copy. A request leaving moves the last active row into its slot (one row copy of that row's
used positions). Capacity grows in chunks (rows and positions) and shrinks when far too large, so
memory follows the number of rows x the longest row, with a copy only when the capacity changes.

Lengths and the row map are host-side Python ints: reading them never synchronises with the device.
Every method that writes the tensors runs under `torch.inference_mode()` (inference tensors may only be
changed there).
"""

from __future__ import annotations

import torch


def _round_up(n: int, chunk: int) -> int:
    return max(chunk, -(-n // chunk) * chunk)


class SlotKVCache:
    """Preallocated per-layer K/V slots with host-side lengths and a request id -> row map."""

    @torch.inference_mode()
    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        max_rows: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        position_chunk: int = 256,
        row_chunk: int = 8,
    ) -> None:
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.max_rows, self.max_positions = max_rows, max_positions
        self.dtype, self.device = dtype, device
        self.position_chunk, self.row_chunk = position_chunk, row_chunk
        self.lengths: list[int] = []  # [num_active] host-side
        self.request_ids: list[str] = []  # [num_active] request id of each row
        self.row_by_request_id: dict[str, int] = {}
        self.keys = self._empty(0, 0)  # [num_layers, row_capacity, H, position_capacity, D]
        self.values = self._empty(0, 0)
        self.num_reallocations = 0

    # ---- shape --------------------------------------------------------------------------------
    def _empty(self, rows: int, positions: int) -> torch.Tensor:
        shape = (self.num_layers, rows, self.num_heads, positions, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def num_active(self) -> int:
        return len(self.request_ids)

    @property
    def row_capacity(self) -> int:
        return int(self.keys.shape[1])

    @property
    def position_capacity(self) -> int:
        return int(self.keys.shape[3])

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()
    def reserve(self, num_rows: int, num_positions: int) -> None:
        """Make room for `num_rows` rows of `num_positions` positions (grows in chunks, copies once)."""
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows requested, the cache holds at most {self.max_rows}")
        if num_positions > self.max_positions:
            raise ValueError(f"{num_positions} positions requested, the model has {self.max_positions}")
        rows, positions = self.row_capacity, self.position_capacity
        if num_rows <= rows and num_positions <= positions:
            return
        new_rows = min(self.max_rows, max(rows, _round_up(num_rows, self.row_chunk)))
        new_positions = min(self.max_positions, max(positions, _round_up(num_positions, self.position_chunk)))
        self._reallocate(new_rows, new_positions)

    @torch.inference_mode()
    def _reallocate(self, rows: int, positions: int) -> None:
        n = self.num_active
        used = min(max(self.lengths, default=0), positions)
        keys, values = self._empty(rows, positions), self._empty(rows, positions)
        keys[:, :n, :, :used] = self.keys[:, :n, :, :used]
        values[:, :n, :, :used] = self.values[:, :n, :, :used]
        self.keys, self.values = keys, values
        self.num_reallocations += 1

    def _maybe_shrink(self) -> None:
        # Hysteresis: shrink only when what is in use fits in half of (capacity - one chunk). Shrinking
        # as soon as the use fits the next smaller chunk (e.g. 8 rows in a 16-row cache) would put
        # the capacity exactly at the growth boundary, so one request joining and leaving there
        # would reallocate (and copy) the whole cache at every join and every leave.
        rows, positions = self.num_active, max(self.lengths, default=0) + 1
        if (
            2 * rows <= self.row_capacity - self.row_chunk
            or 2 * positions <= self.position_capacity - self.position_chunk
        ):
            new_rows = min(_round_up(rows, self.row_chunk), self.row_capacity)
            new_positions = min(_round_up(positions, self.position_chunk), self.position_capacity)
            if (new_rows, new_positions) != (self.row_capacity, self.position_capacity):
                self._reallocate(new_rows, new_positions)

    # ---- rows ---------------------------------------------------------------------------------
    def add_rows(self, request_ids: list[str], lengths: list[int]) -> list[int]:
        """Append rows (at the end of the packed range) for new requests; returns their row indices.

        `lengths` are the rows' lengths once the caller has written them (prefix + prompt).
        """
        for rid in request_ids:
            if rid in self.row_by_request_id:
                raise ValueError(f"request {rid!r} already has row {self.row_by_request_id[rid]}")
        start = self.num_active
        self.reserve(start + len(request_ids), max([*self.lengths, *lengths], default=0) + 1)
        for i, (rid, length) in enumerate(zip(request_ids, lengths, strict=True)):
            self.row_by_request_id[rid] = start + i
            self.request_ids.append(rid)
            self.lengths.append(length)
        return list(range(start, start + len(request_ids)))

    @torch.inference_mode()
    def remove(self, request_id: str) -> None:
        """Free a request's row: the last active row moves into it (one row copy, never the whole cache)."""
        row = self.row_by_request_id.pop(request_id)
        last = self.num_active - 1
        if row != last:
            used = self.lengths[last]
            self.keys[:, row, :, :used] = self.keys[:, last, :, :used]  # [num_layers, H, used, D]
            self.values[:, row, :, :used] = self.values[:, last, :, :used]
            moved = self.request_ids[last]
            self.request_ids[row] = moved
            self.lengths[row] = used
            self.row_by_request_id[moved] = row
        self.request_ids.pop()
        self.lengths.pop()
        self._maybe_shrink()

    @torch.inference_mode()
    def write_prefix(self, row: int, prefix: torch.Tensor) -> None:
        """Copy a prefix `[num_layers, 2, H, L, D]` into cache indices [0, L) of `row`."""
        length = prefix.shape[3]
        self.keys[:, row, :, :length] = prefix[:, 0]  # [num_layers, H, L, D]
        self.values[:, row, :, :length] = prefix[:, 1]

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests)."""
        assert len(self.lengths) == len(self.request_ids) == len(self.row_by_request_id)
        assert self.num_active <= self.row_capacity <= self.max_rows
        for row, rid in enumerate(self.request_ids):
            assert self.row_by_request_id[rid] == row
        assert all(0 <= n <= self.position_capacity for n in self.lengths)

"""Where each row of an attention call reads its prefix: one batched product for every task (host side).

Rows of a step come grouped by prefix (contiguous runs; `GPT2Runner.grouped`). Looping over the
groups costs a dozen small ops per task per layer, which on CPU (and in launches on a GPU) outweighs
the arithmetic of short prefixes. Instead every group's prefix part is one batched matmul per layer, in
one of two layouts, both exact (a prefix column a row may not see gets -inf before the softmax):

- **concat** (G = 1): the distinct prefixes concatenated along the key axis, `[1, H, sum L, D]`; every
  row's query multiplies all of them at once and sees only its own prefix's columns. No reordering, but
  a row pays for the other tasks' columns too: best when prefixes are short.
- **grid** (G = groups): prefixes padded to the longest, `[G, H, max L, D]`, and rows placed in a
  `[G, n]` grid of slots (n = the largest group; empty slots repeat row 0 and their output is dropped):
  each task's queries multiply only its own prefix (the matrix-matrix product per task). Rows without a
  prefix form a group of their own whose (zero) prefix columns they do not see. Best for long prefixes.

`plan_layout` picks the layout with fewer row x key products (own keys counted too, weighted for the
gather that copies them: grid slots pay for them, padding included), with a small allowance for the
grid's two extra index ops per layer.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

# Row x key products the grid layout must save before its reordering (two index ops per layer) pays.
GRID_OVERHEAD_PRODUCTS = 256
# Own keys and values are gathered (copied) out of the paged pool for every slot before the products,
# and grid padding slots are gathered too: on CPU that copy costs more than the multiply. Counting an
# own column as this many products keeps the grid for long prefixes (4 tasks x L=200: grid 22.5 s vs
# concat 24.4 s) and off for many short ones, where its padding slots doubled the gathers
# (16 tasks x L=5-20, 64 rows: grid chosen on ~1/4 of the steps made the engine 0.69x no-prefix; concat
# throughout: 1.0x). Measured with the default and long-prefix bench workloads, 2-core AMD EPYC.
GATHER_WEIGHT = 4


@dataclass(frozen=True)
class PrefixLayout:
    """The prefix layout of one attention call over R rows (see the module docstring)."""

    grid: bool
    group_keys: tuple[Hashable | None, ...]  # prefix key of each stacked group (grid: None = no prefix)
    width: int  # prefix columns Lk: sum of lengths (concat) or the longest (grid)
    slot_rows: list[int]  # [slots] the row whose query each slot holds (grid padding: row 0)
    row_slots: list[int]  # [R] the slot of each row
    lo: list[int]  # [slots] first prefix column the slot may see
    hi: list[int]  # [slots] one past its last (lo == hi: none)

    @property
    def num_slots(self) -> int:
        return len(self.slot_rows)

    @property
    def group_rows(self) -> int:
        """n: slots per group (concat: every row is in the one group)."""
        return self.num_slots // max(1, len(self.group_keys)) if self.grid else self.num_slots

    @property
    def identity(self) -> bool:
        """Slots are the rows in order (no reordering needed)."""
        return self.slot_rows == self.row_slots == list(range(len(self.row_slots)))


def plan_layout(
    row_keys: list[Hashable | None],
    prefix_lengths: dict[Hashable, int],
    own_width: int,
    choice: str = "auto",
) -> PrefixLayout | None:
    """The cheaper layout for rows with these prefix keys (grouped); None when no row has a prefix.

    `prefix_lengths`: L of every key in `row_keys`; `own_width`: S, the own keys every slot attends;
    `choice`: "auto" (by cost), or "concat" / "grid" to force one (tests).
    """
    if choice not in ("auto", "concat", "grid"):
        raise ValueError(f"unknown prefix layout {choice!r}")
    runs: list[tuple[Hashable | None, int, int]] = []  # (key, first row, one past the last)
    for i, key in enumerate(row_keys):
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1], i + 1)
        else:
            runs.append((key, i, i + 1))
    prefixed = [(k, a, b) for k, a, b in runs if k is not None]
    if not prefixed:
        return None
    num_rows = len(row_keys)
    total = sum(prefix_lengths[k] for k, _, _ in prefixed)
    longest = max(prefix_lengths[k] for k, _, _ in prefixed)
    n = max(b - a for _, a, b in runs)
    concat_cost = num_rows * (total + GATHER_WEIGHT * own_width)
    grid_cost = len(runs) * n * (longest + GATHER_WEIGHT * own_width)
    cheaper = len(runs) > 1 and grid_cost + GRID_OVERHEAD_PRODUCTS < concat_cost
    if choice == "grid" or (choice == "auto" and cheaper):
        return _grid(runs, prefix_lengths, n, longest, num_rows)
    return _concat(runs, prefix_lengths, total, num_rows)


def _concat(
    runs: list[tuple[Hashable | None, int, int]], lengths: dict[Hashable, int], total: int, num_rows: int
) -> PrefixLayout:
    keys: list[Hashable] = []
    lo, hi = [0] * num_rows, [0] * num_rows
    offset = 0
    for key, a, b in runs:
        if key is None:
            continue
        keys.append(key)
        lo[a:b] = [offset] * (b - a)
        hi[a:b] = [offset + lengths[key]] * (b - a)
        offset += lengths[key]
    rows = list(range(num_rows))
    return PrefixLayout(False, tuple(keys), total, rows, rows, lo, hi)


def _grid(
    runs: list[tuple[Hashable | None, int, int]],
    lengths: dict[Hashable, int],
    n: int,
    longest: int,
    num_rows: int,
) -> PrefixLayout:
    slot_rows: list[int] = []
    row_slots = [0] * num_rows
    hi: list[int] = []
    for g, (key, a, b) in enumerate(runs):
        slot_rows += range(a, b)
        slot_rows += [0] * (n - (b - a))
        row_slots[a:b] = range(g * n, g * n + b - a)
        hi += [0 if key is None else lengths[key]] * n
    keys = tuple(key for key, _, _ in runs)
    return PrefixLayout(True, keys, longest, slot_rows, row_slots, [0] * len(slot_rows), hi)


def attention_bias(
    firsts: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    num_queries: int,
    own_width: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask of an attention call: [slots, Q, Lk + S], 0 where a slot may attend, -inf not.

    Per slot (`firsts`, `lo`, `hi`: [slots]): query i sees prefix columns [lo, hi) and own keys
    [0, first + i]. Built on the device from these few integers, once per step (every layer uses it).
    """
    device = firsts.device
    queries = torch.arange(num_queries, device=device)  # [Q]
    own = torch.arange(own_width, device=device)  # [S]
    allowed = own[None, None, :] <= (firsts[:, None] + queries[None, :])[:, :, None]  # [slots, Q, S]
    if width:
        cols = torch.arange(width, device=device)  # [Lk]
        prefix_ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])  # [slots, Lk]
        allowed = torch.cat([prefix_ok[:, None, :].expand(-1, num_queries, -1), allowed], dim=-1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

"""Paged KV cache for GPT-2 rows' own tokens, plus one shared copy of each task's prefix.

Layout rule (the one rule the GPT-2 runner and its tests rely on):

    pool.keys, pool.values: [num_layers, H, num_blocks * block_size, D]    flat "slots", head-major
        slot s belongs to block s // block_size; blocks are handed out from a free list (lowest id
        first, so on a CPU only the low end of the pool is ever touched) and returned when a row leaves.

    row of request q, with prefix length L (0 without a prefix), P prompt tokens of which C are
    computed so far, and G tokens fed back (length = C + G while prefilling, P + G after):

        own token t (0 <= t < length)  sits at slot  blocks[t // block_size] * block_size + t % block_size
                                       and has position id  L + t  (real tokens start at position L,
                                       as in the prefix-tuning paper and PEFT)
        the prefix is NOT in the pool: its keys/values live once per (task, version) in the
        `PrefixPool` (`[num_layers, 2, H, L, D]`, the prefix cache's own device tensor, not a copy),
        shared by every row of that task and version and reference-counted by them.

    Attention of own token t reads the whole prefix of its (task, version) and own tokens [0, t]; the
    two parts' scores go through one softmax (see `attention.py`), which is attention over the
    concatenation [prefix | own tokens] that PEFT computes. For that, `PrefixPool.stacked` keeps the
    prefixes of a step's rows stacked `[H, G, Lk, D]` per layer (a copy, while the batch reads them).

A row's blocks never move: a request leaving frees its blocks and nothing else changes (no row copies,
no reallocation). Memory in use follows the tokens in use (`used_bytes`); the pool is sized once from
the KV budget in bytes. On CUDA the pool is allocated up front (like vLLM's); on CPU `torch.empty`
reserves address space only, and pages are touched as blocks are first used.

Lengths, block tables and refcounts are host-side Python ints: reading them never synchronises with the
device. Every method that writes tensors runs under `torch.inference_mode()`.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from server.engine.prefix_layout import PrefixLayout

# Stacked prefix layouts kept for reuse: a steady batch needs two (its decode and its prefill rows).
MAX_STACKS = 4
_StackKey = tuple[bool, tuple[Hashable | None, ...], int, torch.dtype]  # grid, group keys, width, dtype


@dataclass
class PagedRow:
    """Host-side state of one row: its blocks, its own-token count and the prefix it reads."""

    prefix_key: Hashable | None  # None: the bare model
    prefix_length: int
    num_prompt_tokens: int
    length: int = 0  # own tokens whose K/V are in the pool
    blocks: list[int] = field(default_factory=list)
    slot_ids: list[int] = field(default_factory=list)  # pool slot of each own token (kept for gathers)

    @property
    def prefilled(self) -> bool:
        return self.length >= self.num_prompt_tokens


@dataclass
class _Stack:
    keys: list[torch.Tensor]  # per layer [H, G, Lk, D]
    values: list[torch.Tensor]
    nbytes: int  # 0 when a view of the one prefix it holds


@dataclass
class _PrefixEntry:
    kv: torch.Tensor  # [num_layers, 2, H, L, D] on the runner's device and dtype
    refs: int = 0


class PrefixPool:
    """One copy of each (task, version)'s prefix K/V, reference-counted by the rows that read it.

    The tensor is the prefix cache's own device tensor: holding it here keeps it alive while rows use
    it even if the cache evicts it, and a new version of a task is a new key, so it coexists with the
    old one until the old one's last row leaves.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, _PrefixEntry] = {}
        self.peak_bytes = 0
        # (grid, group keys, width, dtype) -> per-layer stacked keys, values: [H, G, Lk, D] each
        self._stacks: dict[_StackKey, _Stack] = {}

    def acquire(self, key: Hashable, kv: torch.Tensor) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _PrefixEntry(kv)
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        entry.refs += 1

    def release(self, key: Hashable) -> None:
        entry = self._entries[key]
        entry.refs -= 1
        if entry.refs == 0:
            del self._entries[key]
            # A stack holding this prefix would keep it alive (and a ("tensor", id) key may be reused).
            for stack_key in [k for k in self._stacks if key in k[1]]:
                del self._stacks[stack_key]

    def stacked(
        self, layout: PrefixLayout, dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The prefixes of `layout` stacked for one batched product: per layer keys, values [H, G, Lk, D].

        Concat: the prefixes side by side on the key axis (G = 1); grid: one per group, zero-padded to
        Lk (a group without a prefix gets zeros, which its rows never see). Built once and kept while
        the batch reads the same prefixes (a copy of them, in `dtype`).
        """
        stack_key = (layout.grid, layout.group_keys, layout.width, dtype)
        hit = self._stacks.pop(stack_key, None)
        if hit is None:
            hit = self._stack(layout, dtype)
            if len(self._stacks) >= MAX_STACKS:
                del self._stacks[next(iter(self._stacks))]  # the least recently used
        self._stacks[stack_key] = hit
        return hit.keys, hit.values

    def _stack(self, layout: PrefixLayout, dtype: torch.dtype) -> _Stack:
        sources = [None if k is None else self._entries[k].kv for k in layout.group_keys]
        if layout.grid:
            first = next(kv for kv in sources if kv is not None)
            num_layers, _, H, _, D = first.shape
            stack = first.new_zeros(num_layers, 2, H, len(sources), layout.width, D, dtype=dtype)
            for g, kv in enumerate(sources):
                if kv is not None:
                    stack[:, :, :, g, : kv.shape[3]] = kv  # [layers, 2, H, L, D]
        else:  # one prefix: a view of it, no copy
            parts = [kv for kv in sources if kv is not None]
            stack = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)).unsqueeze(3).to(dtype)
        # stack: [layers, 2, H, G, Lk, D]
        copied = not any(
            stack.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
            for kv in sources
            if kv is not None
        )
        nbytes = stack.numel() * stack.element_size() if copied else 0
        return _Stack(list(stack[:, 0].unbind(0)), list(stack[:, 1].unbind(0)), nbytes)

    def get(self, key: Hashable) -> torch.Tensor:
        return self._entries[key].kv

    def refs(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.refs

    @property
    def keys(self) -> list[Hashable]:
        return list(self._entries)

    @property
    def stacked_bytes(self) -> int:
        """Bytes of the kept stacks that are copies (a single prefix's stack is a view of it)."""
        return sum(stack.nbytes for stack in self._stacks.values())

    @property
    def nbytes(self) -> int:
        return sum(e.kv.numel() * e.kv.element_size() for e in self._entries.values())


class PagedKVCache:
    """A block pool with per-row block tables (vLLM style) and the shared `PrefixPool`."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one slot")
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device = dtype, device
        # Head-major, so a gather of rows' slots is already [H, rows*S, D], the layout attention needs.
        shape = (num_layers, num_heads, num_blocks * block_size, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # [num_layers, H, slots, D]
        self.values = torch.empty(shape, dtype=dtype, device=device)
        # Row of head h's slot s in a layer's pool viewed [H * slots, D]: h * slots + s. Attention
        # gathers along that first dimension (whole rows), ~1.6x faster on CPU than along dim 1.
        self.head_offsets = torch.arange(num_heads, device=device) * (num_blocks * block_size)  # [H]
        self.rows: dict[str, PagedRow] = {}
        self.prefixes = PrefixPool()
        self._free: list[int] = list(range(num_blocks))  # a heap: lowest block first
        self.peak_blocks = 0

    # ---- sizes --------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one own token takes in the pool (keys and values, every layer)."""
        return 2 * num_layers * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bytes_per_token(
            self.num_layers, self.num_heads, self.head_dim, self.dtype
        )

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.num_used_blocks * self.block_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def reset_peaks(self) -> None:
        """Start peak tracking over (benchmarks: after their warm-up)."""
        self.peak_blocks = self.num_used_blocks
        self.prefixes.peak_bytes = self.prefixes.nbytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- rows ---------------------------------------------------------------------------------
    def add_row(
        self,
        request_id: str,
        num_prompt_tokens: int,
        prefix_key: Hashable | None = None,
        prefix_kv: torch.Tensor | None = None,
    ) -> PagedRow:
        """Register a row (no blocks yet). `prefix_kv`: `[num_layers, 2, H, L, D]`, shared by key."""
        if request_id in self.rows:
            raise ValueError(f"request {request_id!r} already has a row")
        length = 0
        if prefix_kv is not None:
            if prefix_key is None:
                raise ValueError("a prefix needs a key (rows of one (task, version) share it)")
            self.prefixes.acquire(prefix_key, prefix_kv)
            length = int(prefix_kv.shape[3])
        row = PagedRow(prefix_key if prefix_kv is not None else None, length, num_prompt_tokens)
        self.rows[request_id] = row
        return row

    def remove(self, request_id: str) -> None:
        """Free a row's blocks and its prefix reference. Nothing else moves."""
        row = self.rows.pop(request_id)
        for block in row.blocks:
            heapq.heappush(self._free, block)
        if row.prefix_key is not None:
            self.prefixes.release(row.prefix_key)

    def append_slots(self, request_id: str, num_tokens: int) -> list[int]:
        """Slots for the row's next `num_tokens` own tokens (allocating blocks); advances its length."""
        row = self.rows[request_id]
        start, end = row.length, row.length + num_tokens
        need = self.blocks_for(end) - len(row.blocks)
        if need > len(self._free):
            raise MemoryError(
                f"KV pool exhausted: {need} blocks needed, {len(self._free)} free (the budget admits fewer)"
            )
        row.blocks.extend(heapq.heappop(self._free) for _ in range(need))
        self.peak_blocks = max(self.peak_blocks, self.num_used_blocks)
        row.length = end
        bs = self.block_size
        new = [row.blocks[t // bs] * bs + t % bs for t in range(start, end)]
        row.slot_ids += new
        return new

    def truncate(self, request_id: str, length: int) -> None:
        """Undo appends past `length` (a failed step): the row's extra blocks go back to the pool."""
        row = self.rows[request_id]
        row.length = min(row.length, length)
        del row.slot_ids[row.length :]
        while len(row.blocks) > self.blocks_for(row.length):
            heapq.heappush(self._free, row.blocks.pop())

    def grouped(self, request_ids: list[str]) -> list[str]:
        """`request_ids` reordered so rows of one prefix are contiguous (first appearance order): the
        runs `prefix_layout.plan_layout` turns into one batched product per prefix."""
        rank: dict[Hashable | None, int] = {}
        return sorted(request_ids, key=lambda r: rank.setdefault(self.rows[r].prefix_key, len(rank)))

    def slots(self, request_id: str, num_tokens: int) -> list[int]:
        """Slots of the row's first `num_tokens` own tokens (for gathering its keys/values)."""
        return self.rows[request_id].slot_ids[:num_tokens]

    def check_invariants(self) -> None:
        """Assert the layout rule's bookkeeping (used by tests)."""
        owned = [b for row in self.rows.values() for b in row.blocks]
        assert len(owned) == len(set(owned)), "a block belongs to two rows"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(owned) + len(self._free) == self.num_blocks, "a block was lost"
        refs: dict[Hashable, int] = {}
        for row in self.rows.values():
            assert len(row.blocks) == self.blocks_for(row.length), "blocks do not follow the row's length"
            bs = self.block_size
            expected = [row.blocks[t // bs] * bs + t % bs for t in range(row.length)]
            assert row.slot_ids == expected, "a row's slot list does not follow its blocks"
            if row.prefix_key is not None:
                refs[row.prefix_key] = refs.get(row.prefix_key, 0) + 1
                assert row.prefix_length == self.prefixes.get(row.prefix_key).shape[3]
        assert refs == {k: self.prefixes.refs(k) for k in self.prefixes.keys}, "prefix refcounts drifted"

"""Which rows of the model's prefix table hold which prefix: an allocator with LRU eviction.

The table (`model.py`) has a fixed number of rows, one per prefix position; a prefix of length L
takes any L free rows (they need not be contiguous: each virtual id names its own row). An entry is
keyed by (tenant, task, version) and is *pinned* while requests that use it are queued or running
(`acquire` / `release`); unpinned entries stay resident (a later request of the task needs no copy) and
are evicted least recently used first when rows are needed. Pure bookkeeping: the engine copies the
rows' contents (through the worker extension) after `allocate` and before any request uses them.

Because the table's rows are reused, a request's vLLM `cache_salt` names (tenant, task, version) and
the digest of the bytes written into its rows: vLLM's prefix cache then never hands a request blocks
computed from another prefix that sat in the same rows before, not even one a store reissued under
the same version number (a Redis failover that lost writes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

Key = tuple[str, str, int]  # (tenant, task, version)


@dataclass
class RowEntry:
    key: Key
    rows: list[int]
    pins: int = 0
    written: bool = False  # its rows hold the prefix (the copy finished)
    digest: str = ""  # of the bytes written into its rows (part of its requests' cache_salt)


@dataclass
class PrefixRows:
    """See the module docstring. `capacity_rows` is the table's row count."""

    capacity_rows: int
    _free: set[int] = field(init=False)
    _entries: OrderedDict[Key, RowEntry] = field(init=False, default_factory=OrderedDict)  # LRU first
    evictions: int = 0

    def __post_init__(self) -> None:
        self._free = set(range(self.capacity_rows))

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def used_rows(self) -> int:
        return self.capacity_rows - len(self._free)

    @property
    def written_rows(self) -> int:
        """Rows that hold a prefix now (the table's resident bytes, in rows)."""
        return sum(len(entry.rows) for entry in self._entries.values() if entry.written)

    def get(self, key: Key) -> RowEntry | None:
        return self._entries.get(key)

    def resident(self) -> list[Key]:
        """Keys whose rows hold their prefix now, least recently used first."""
        return [key for key, entry in self._entries.items() if entry.written]

    def acquire(self, key: Key) -> RowEntry | None:
        """Pin the resident (or being written) entry of `key` and mark it most recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.pins += 1
            self._entries.move_to_end(key)
        return entry

    def allocate(self, key: Key, length: int) -> RowEntry | None:
        """A new pinned entry of `length` rows, evicting unpinned entries (LRU first) as needed; None if
        the pinned entries leave too few rows (retry after a `release`). `key` must not be present."""
        assert key not in self._entries, f"{key} already has rows"
        if length > self.capacity_rows:
            raise ValueError(
                f"a prefix of {length} positions does not fit a table of {self.capacity_rows} rows"
            )
        if length > len(self._free) + sum(len(e.rows) for e in self._entries.values() if e.pins == 0):
            return None
        for old_key in [k for k, e in self._entries.items() if e.pins == 0]:
            if len(self._free) >= length:
                break
            self.drop(old_key)
            self.evictions += 1
        # The lowest free rows: deterministic, and a prefix often lands on the rows its predecessor had.
        rows = sorted(self._free)[:length]
        self._free.difference_update(rows)
        entry = RowEntry(key, rows, pins=1)
        self._entries[key] = entry
        return entry

    def release(self, key: Key) -> None:
        """One user of `key` is done (its entry stays resident, unpinned when nobody uses it)."""
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def drop(self, key: Key) -> None:
        """Forget `key` and free its rows (an unpinned entry, or one whose write failed)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free.update(entry.rows)

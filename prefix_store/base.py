"""The `PrefixStore` protocol: where prefix artifacts live, by tenant, task and version.

A store holds opaque artifact bytes (a safetensors file, validated elsewhere, in `artifact.py`) under
`(tenant, task, version)`. Every `put` creates a new immutable version and moves the task's
"current" pointer to it; `rollback` moves the pointer back to a version that still exists. Versions
are numbered per task from 1 and are never reused, not even after `delete`, so a cache keyed by
`(tenant, task, version)` can never serve the bytes of an older incarnation of a task.

The tenant is a parameter of every call and every key/path is built from it: there is no call that
reaches across tenants. Names are checked by `validate_name` before they touch a key or a path.

Backends: `RedisPrefixStore` (shared by all server replicas, the source of truth in a deployment)
and `LocalPrefixStore` (a directory; the embedded default for one process). Both report changes to
`subscribe`d callbacks as `ChangeEvent`s, which is how server replicas evict stale cached prefixes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from prefix_store.traffic import validate_split

_logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NAME_LENGTH",
    "ChangeCallback",
    "ChangeEvent",
    "InvalidName",
    "PrefixStore",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "StoredPrefix",
    "TaskInfo",
    "TaskNotFound",
    "TaskPage",
    "VersionInfo",
    "VersionNotFound",
    "validate_name",
]

MAX_NAME_LENGTH = 64
# Letters, digits, '.', '_' and '-', starting with a letter or digit. This excludes path separators,
# ':' (our Redis key separator), whitespace and control characters, and names such as "." and "..".
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StoreError(Exception):
    """Base class of every error a prefix store raises."""


class InvalidName(StoreError, ValueError):
    """A tenant or task name that may not be used as a key or a path component."""


class TaskNotFound(StoreError):
    """The tenant has no task of that name (or it was deleted)."""


class VersionNotFound(StoreError):
    """The task exists but that version does not (never created, or pruned by `keep_versions`)."""


class StoreUnavailable(StoreError):
    """The backend could not be reached in time (connection refused, timeout, server loading...).

    Callers treat this as transient: serve what is cached, report the store as down, retry later.
    """


class StoreCorrupt(StoreUnavailable):
    """The backend answered with data it could not have written (a non-integer `current`, metadata
    that is not a version's JSON...). Logged with the key and reason where it is detected; callers
    treat it like an outage (503, serve what is cached) because a client can do nothing about it.
    """


_STORED_INT_RE = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_stored_version(raw: bytes | str, where: str) -> int:
    """A version number read back from a store (a pointer or counter); garbage raises `StoreCorrupt`
    after logging `where` (the key or path) and what was found, instead of a bare ValueError (a 500)."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not _STORED_INT_RE.fullmatch(text):
        _logger.error("prefix store data corrupt: %s holds %r, not a version number", where, text[:40])
        raise StoreCorrupt("prefix store data is corrupt (see the server log)")
    return int(text)


def parse_stored_info(raw: bytes | str, where: str) -> VersionInfo:
    """A `VersionInfo` read back from a store as JSON; garbage raises `StoreCorrupt` (logged)."""
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON {type(obj).__name__}, not an object")
        return VersionInfo.from_json_dict(obj)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        _logger.error("prefix store data corrupt: %s is not a version's metadata (%s)", where, exc)
        raise StoreCorrupt("prefix store data is corrupt (see the server log)") from None


def parse_stored_split(raw: bytes | str, where: str) -> dict[int, int]:
    """A traffic split read back from a store; anything `validate_split` would refuse (garbage JSON,
    loose version keys, bad percents) raises `StoreCorrupt` (logged), never a bare ValueError."""
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON {type(obj).__name__}, not an object")
        return validate_split(obj)
    except (ValueError, TypeError, RecursionError) as exc:  # InvalidSplit is a ValueError
        _logger.error("prefix store data corrupt: %s is not a traffic split (%s)", where, str(exc)[:200])
        raise StoreCorrupt("prefix store data is corrupt (see the server log)") from None


def check_stored_bytes(info: VersionInfo, data: bytes, where: str) -> None:
    """Raise `StoreCorrupt` (logged) when a blob read back does not match the size and sha256 its
    metadata recorded at `put` (a flipped byte, a truncated file): it is never served."""
    if len(data) != info.size_bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        _logger.error(
            "prefix store data corrupt: %s holds %d bytes that do not match the recorded size %d / sha256",
            where,
            len(data),
            info.size_bytes,
        )
        raise StoreCorrupt("prefix store data is corrupt (see the server log)")


def validate_name(name: object, kind: str = "name") -> str:
    """Return `name` if it is a valid tenant or task name, else raise `InvalidName`.

    Valid: 1-64 characters from `[A-Za-z0-9._-]`, the first a letter or digit. `kind` ("tenant",
    "task") only makes the error message name what was wrong.
    """
    if not isinstance(name, str):
        raise InvalidName(f"{kind} must be a string, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} must be 1-{MAX_NAME_LENGTH} characters long, got {len(name)}")
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidName(
            f"invalid {kind} {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of a task's prefix artifact."""

    tenant: str
    task: str
    version: int  # 1, 2, ... per task; never reused
    sha256: str  # hex digest of the stored bytes
    size_bytes: int
    created_at: float  # unix time of the put
    metadata: dict[str, Any] = field(default_factory=dict)  # caller's JSON-serialisable metadata

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object both backends store next to the blob."""
        return {
            "tenant": self.tenant,
            "task": self.task,
            "version": self.version,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "metadata": self.metadata,
        }

    @classmethod
    def from_json_dict(cls, obj: dict[str, Any]) -> VersionInfo:
        """Inverse of `to_json_dict`."""
        return cls(
            tenant=str(obj["tenant"]),
            task=str(obj["task"]),
            version=int(obj["version"]),
            sha256=str(obj["sha256"]),
            size_bytes=int(obj["size_bytes"]),
            created_at=float(obj["created_at"]),
            metadata=dict(obj.get("metadata") or {}),
        )


@dataclass(frozen=True)
class StoredPrefix:
    """A version's info and its bytes; `len(data) == info.size_bytes`, sha256 matches."""

    info: VersionInfo
    data: bytes


@dataclass(frozen=True)
class TaskInfo:
    """A task's current version and every version still kept (ascending by version)."""

    current: VersionInfo
    versions: list[VersionInfo]
    split: dict[int, int] = field(default_factory=dict)  # version -> percent; {} = none


@dataclass(frozen=True)
class TaskPage:
    """One page of `list_tasks`: the current version of each task, ordered by task name.

    `next_cursor` is None on the last page; otherwise pass it back to get the next page. `broken`
    names the page's tasks whose stored data is corrupt (logged where found): they are not in
    `items`, but they exist (they count against quotas, and an upload of a new version repairs them).
    """

    items: list[VersionInfo]
    next_cursor: str | None
    broken: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChangeEvent:
    """A task's current version changed (put or rollback), or the task was deleted (version None)."""

    tenant: str
    task: str
    version: int | None


# Callbacks may be plain functions or coroutine functions; exceptions they raise are logged, not
# propagated, so one bad subscriber cannot stop notifications for the others.
ChangeCallback = Callable[[ChangeEvent], None] | Callable[[ChangeEvent], Awaitable[None]]


@runtime_checkable
class PrefixStore(Protocol):
    """Versioned, per-tenant storage of prefix artifacts. All methods are coroutines except `subscribe`.

    Every method that talks to a backend raises `StoreUnavailable` when the backend cannot be
    reached, and `InvalidName` for a bad tenant or task name, before touching the backend.
    """

    async def put(self, tenant: str, task: str, data: bytes, metadata: dict[str, Any]) -> VersionInfo:
        """Store `data` as a new version of the task and make it current. Returns the new version."""
        ...

    async def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrefix:
        """Return the current version (or `version`). Raises `TaskNotFound` / `VersionNotFound`."""
        ...

    async def current_version(self, tenant: str, task: str) -> int | None:
        """The task's current version number, or None if there is no such task."""
        ...

    async def describe(self, tenant: str, task: str) -> TaskInfo:
        """The current version and all kept versions. Raises `TaskNotFound`."""
        ...

    async def list_tasks(self, tenant: str, cursor: str | None = None, limit: int = 100) -> TaskPage:
        """One page of the tenant's tasks in name order, starting after `cursor` (a task name)."""
        ...

    async def delete(self, tenant: str, task: str) -> None:
        """Delete the task and all its versions. Raises `TaskNotFound`."""
        ...

    async def rollback(self, tenant: str, task: str, version: int) -> VersionInfo:
        """Make an existing (kept) version current again and end any traffic split (so it is also
        "promote"). Raises `TaskNotFound` / `VersionNotFound`."""
        ...

    async def set_split(self, tenant: str, task: str, split: dict[int, int]) -> None:
        """Spread the task's requests over kept versions by percent (`traffic.validate_split`), or end
        the split (`{}`). Weighted versions are never pruned. Notifies subscribers. Raises
        `TaskNotFound` / `VersionNotFound` / `traffic.InvalidSplit`."""
        ...

    async def get_split(self, tenant: str, task: str) -> dict[int, int]:
        """The task's traffic split ({} when none, or no such task)."""
        ...

    def subscribe(self, callback: ChangeCallback) -> None:
        """Call `callback(ChangeEvent)` on every change of any task's current version."""
        ...

    async def start(self) -> None:
        """Start background work (change listener). Does not fail when the backend is down."""
        ...

    async def close(self) -> None:
        """Stop background work and release connections. Idempotent."""
        ...

    async def record_uses(self, uses: dict[tuple[str, str], int]) -> None:
        """Add requests served per (tenant, task) to the store's counts (`prefix_store.usage`)."""
        ...

    async def most_used(self, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (0-1000) (tenant, task) pairs with the highest counts, most used first."""
        ...

"""Tiered prefix cache: device LRU -> host (CPU) LRU -> the prefix store.

Entries are keyed by (tenant, task, version) and sit in exactly one tier. A store read lands in the
host tier (pinned memory on CUDA); moving it to the device (`to_device`) promotes it, and a
device-tier eviction demotes the entry back to the host tier. Each tier is an LRU bounded in bytes;
an entry larger than a tier's whole budget is still returned to its caller, just not kept there.

Two steps per request, so the engine can queue a request before its prefix is on the
device: `locate` finds the version and its artifact in the nearest tier (reading the store on a
miss; this is where `UnknownTask`, `StoreUnavailable` and `InvalidPrefix` come from), and
`to_device` brings it to the device: a copy issued from a worker thread, on a side CUDA stream with an
event the step waits on (see `prefix_transfer`), single-flight per key. `resolve` does both.

Versions: the cache tracks each task's current version, learned from `store.get` only; the store's
change notifications (`store.subscribe`) are hints that make it forget the task's version and drop
its entries of other versions, so the next request reads the current one from the store; requests already running hold their own reference to the tensors
(and have already copied them into their KV rows), so they finish on the version they started with.

Loads are single-flight: concurrent misses of one task await one load task, so one store read
and one validation serve them all. Blobs are validated with `load_artifact(data, spec, limits)` (the
configured upload limits) before use.
With the store down, cached current versions keep serving and uncached tasks raise `StoreUnavailable`.

Traffic splits: a task whose store keeps a split serves each request
the version `pick_version(split, ..., route_key)` names; the split is read from the store once per
task and forgotten on every change notification of the task (re-read on the next request), so
every replica follows the store's split. A split's versions are loaded and cached like current ones.

Runs on the event loop; validation of a blob and host->device copies are done in worker threads.
Demotion copies nothing: an entry promoted from the host keeps its (pinned) host copy aside while it
is on the device, so eviction hands that back to the host tier (host memory up to both tiers'
budgets); only an entry with no host copy is copied back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from modeling.model_spec import ModelSpec
from prefix_store.artifact import ArtifactError, PrefixArtifact, load_artifact
from prefix_store.base import (
    ChangeEvent,
    PrefixStore,
    StoreCorrupt,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
)
from prefix_store.traffic import pick_version, primary_version
from server.engine.errors import InvalidPrefix, UnknownTask
from server.engine.prefix_transfer import DevicePrefix, PrefixTransfer
from server.limits import Limits

logger = logging.getLogger(__name__)

TIERS = ("device", "host")
Key = tuple[str, str, int]  # (tenant, task, version)


class CacheListener(Protocol):
    def on_prefix_load(self, seconds: float) -> None: ...
    def on_cache_event(self, kind: str, tier: str) -> None: ...
    def on_store_read(self, reason: str, nbytes: int) -> None: ...


@dataclass
class PrefixCacheStats:
    """Counters for metrics. `hits`/`evictions`/`bytes` are per tier."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    loads: int = 0
    store_reads: dict[str, int] = field(default_factory=dict)  # reason ("request", "warm") -> blobs read


class _LRU:
    """An LRU of artifacts bounded in bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.items: OrderedDict[Key, PrefixArtifact] = OrderedDict()
        self.nbytes = 0

    def pop(self, key: Key) -> PrefixArtifact | None:
        artifact = self.items.pop(key, None)
        if artifact is not None:
            self.nbytes -= artifact.nbytes
        return artifact

    def put(
        self, key: Key, artifact: PrefixArtifact, least_recent: bool = False
    ) -> list[tuple[Key, PrefixArtifact]]:
        """Insert as most recent (or as least recent: first to go, so it never pushes out anything
        that was there); returns what was evicted to make room (maybe `artifact` itself)."""
        if artifact.nbytes > self.budget:
            return [(key, artifact)]
        self.items[key] = artifact
        if least_recent:
            self.items.move_to_end(key, last=False)
        self.nbytes += artifact.nbytes
        evicted = []
        while self.nbytes > self.budget:
            old_key, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
            evicted.append((old_key, old))
        return evicted


@dataclass(frozen=True)
class ResolvedPrefix:
    version: int
    artifact: PrefixArtifact  # in the serving dtype; on the device when `on_device`, else on the host
    variant: str = "current"  # "current" (no split), or the split's "primary" / "canary"
    on_device: bool = True
    ready: Any = None  # CUDA: the event the device copy completes at (see `prefix_transfer`)

    @property
    def device_prefix(self) -> DevicePrefix:
        return DevicePrefix(self.artifact, self.ready)


class PrefixCache:
    """See the module docstring. `resolve(tenant, task)` is the one call the engine makes per request."""

    def __init__(
        self,
        store: PrefixStore,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        limits: Limits,
        listener: CacheListener | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.limits = limits  # tier budgets here; the same upload limits as the API when loading blobs
        self.device, self.dtype = device, dtype
        self.transfer = PrefixTransfer(device, dtype)
        self.listener = listener
        self.stats = PrefixCacheStats()
        self._tiers = {
            "device": _LRU(limits.device_prefix_cache_bytes),
            "host": _LRU(limits.host_prefix_cache_bytes),
        }
        self._current: dict[tuple[str, str], int] = {}  # task -> current version, as last heard
        self._loading: dict[tuple[str, str], asyncio.Future[ResolvedPrefix]] = {}  # single-flight loads
        # Traffic splits as last read ({} = none), and a count of change notifications so a
        # read that raced one is not kept (one counter for all tasks: a per-task count would keep an
        # entry for every task name ever changed; a race with another task's change only costs a re-read).
        self._splits: dict[tuple[str, str], dict[int, int]] = {}
        self._changes = 0
        self._version_loads: dict[Key, asyncio.Future[PrefixArtifact]] = {}
        self._transfers: dict[Key, asyncio.Future[DevicePrefix]] = {}  # single-flight host->device copies
        self._ready: dict[Key, Any] = {}  # device-tier key -> the CUDA event its copy completes at
        self._host_copies: dict[Key, PrefixArtifact] = {}  # device-tier key -> the host copy it came from
        self._subscribed = False
        # Warm start: tasks being warmed enter the host tier as least recent (see `warm`).
        self._warming: set[tuple[str, str]] = set()
        # Requests per task since the last `flush_uses` (the store keeps the totals for warm starts).
        self._uses: dict[tuple[str, str], int] = {}

    def start(self) -> None:
        """Subscribe to the store's change notifications (idempotent)."""
        if not self._subscribed:
            self.store.subscribe(self.on_change)
            self._subscribed = True

    # ---- change notifications -----------------------------------------------------------------
    def on_change(self, event: ChangeEvent) -> None:
        """A task's current version moved (or it was deleted): drop its entries of other versions.

        The event is only a hint (anyone who can publish on the store's channel can spoof one): the
        current version is forgotten, not taken from the event, and the next request reads it from the
        store. A spoofed version therefore costs one store read, and cannot pin the task to a version
        that never comes (which used to disable caching for the task for good).
        """
        task = (event.tenant, event.task)
        self._splits.pop(task, None)
        self._changes += 1
        self._current.pop(task, None)
        for tier in self._tiers.values():
            for key in [k for k in tier.items if k[:2] == task and k[2] != event.version]:
                tier.pop(key)
        # A load in flight may have read the old version (or the deleted task): it still answers the
        # requests already waiting on it, but requests from now on start a new load, and the stale
        # one must not put what it read into the cache (see `_load`).
        self._loading.pop(task, None)
        if event.version is None:
            # Deleted: its uses not yet flushed would only bring its name back into the store's counts
            # (and keep one entry per deleted name here while the store is unreachable).
            self._uses.pop(task, None)
        self._update_gauges()

    # ---- lookups ------------------------------------------------------------------------------
    async def resolve(self, tenant: str, task: str, route_key: str | None = None) -> ResolvedPrefix:
        """`locate`, then `to_device`: the version to serve and its artifact on the device."""
        return await self.to_device(tenant, task, await self.locate(tenant, task, route_key))

    async def locate(self, tenant: str, task: str, route_key: str | None = None) -> ResolvedPrefix:
        """The version to serve (the current one, or under a traffic split the one `route_key` is
        pinned to) and its artifact in the nearest tier (`on_device` says which).

        Raises `UnknownTask`, `StoreUnavailable` (store down and not cached), `InvalidPrefix`.
        """
        found = await self._locate(tenant, task, route_key)
        self.add_uses((tenant, task), 1)  # tasks that exist only
        return found

    async def _locate(self, tenant: str, task: str, route_key: str | None) -> ResolvedPrefix:
        split = await self._split(tenant, task)
        if split:
            version = pick_version(split, tenant, task, route_key or "")
            variant = "primary" if version == primary_version(split) else "canary"
            try:
                artifact = await self._version(tenant, task, version)
                return self._found((tenant, task, version), artifact, variant)
            except VersionNotFound:
                pass  # the split changed under us (promoted, deleted): serve the current version
        try:
            return await self._resolve_current(tenant, task)
        except UnknownTask:
            self._splits.pop((tenant, task), None)  # no entries for names that are not tasks
            raise

    async def to_device(self, tenant: str, task: str, found: ResolvedPrefix) -> ResolvedPrefix:
        """`found` with its artifact on the device: as it is if it is there, else the device tier's
        copy, else a copy made once however many requests want it (and kept in the device tier)."""
        if found.on_device:
            return found
        key = (tenant, task, found.version)
        resident = self._tiers["device"].items.get(key)
        if resident is not None:
            return ResolvedPrefix(found.version, resident, found.variant, True, self._ready.get(key))
        copy = self._transfers.get(key)
        if copy is None:
            copy = asyncio.ensure_future(self._copy_to_device(key, found.artifact))
            self._transfers[key] = copy
            copy.add_done_callback(lambda done: self._transfers.pop(key, None))
        moved = await asyncio.shield(copy)
        return ResolvedPrefix(found.version, moved.artifact, found.variant, True, moved.ready)

    async def _copy_to_device(self, key: Key, host: PrefixArtifact) -> DevicePrefix:
        moved = await asyncio.to_thread(self.transfer.to_device, host)
        if self._wanted(key):  # not a version a change notification retired meanwhile
            self._tiers["host"].pop(key)  # an entry sits in one tier
            if moved.ready is not None:
                self._ready[key] = moved.ready
            self._host_copies[key] = host
            self._insert(key, moved.artifact)
        return moved

    def _wanted(self, key: Key) -> bool:
        task, version = key[:2], key[2]
        return self._current.get(task) == version or version in self._splits.get(task, {})

    def _found(self, key: Key, artifact: PrefixArtifact, variant: str = "current") -> ResolvedPrefix:
        on_device = self._tiers["device"].items.get(key) is artifact
        return ResolvedPrefix(
            key[2], artifact, variant, on_device, self._ready.get(key) if on_device else None
        )

    async def _split(self, tenant: str, task: str) -> dict[int, int]:
        key = (tenant, task)
        split = self._splits.get(key)
        if split is not None:
            return split
        changes = self._changes
        try:
            split = await self.store.get_split(tenant, task)
        except StoreCorrupt:
            # A split nobody can read: serving the current version instead would send every request
            # to what is often the canary. The task answers 503 until the split is ended or replaced.
            raise
        except StoreUnavailable:
            if self._cached_current(tenant, task):
                return {}  # serve the cached current version while the store is away
            raise  # now, not after a second store call's deadline: the load would fail the same way
        if self._changes == changes:  # no change notification raced this read
            self._splits[key] = split
        return split

    def _cached_current(self, tenant: str, task: str) -> bool:
        version = self._current.get((tenant, task))
        return version is not None and any((tenant, task, version) in t.items for t in self._tiers.values())

    async def _version(self, tenant: str, task: str, version: int) -> PrefixArtifact:
        """One specific version's artifact: cached, or loaded once however many requests want it."""
        key = (tenant, task, version)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        load = self._version_loads.get(key)
        if load is None:
            self.stats.misses += 1
            self._notify("miss", "store")
            load = asyncio.ensure_future(self._load_version(key))
            self._version_loads[key] = load
            load.add_done_callback(lambda done: self._version_loads.pop(key, None))
        return await asyncio.shield(load)

    async def _load_version(self, key: Key) -> PrefixArtifact:
        tenant, task, version = key
        started = time.perf_counter()
        try:
            stored = await self.store.get(tenant, task, version)
        except TaskNotFound:
            raise UnknownTask(f"tenant {tenant!r} has no task {task!r}") from None
        self._read(tenant, task, stored.data)
        artifact = await self._validated(stored.data, tenant, task, version)
        self.stats.loads += 1
        if self.listener is not None:
            self.listener.on_prefix_load(time.perf_counter() - started)
        self._insert_host(key, artifact)
        return artifact

    async def _validated(self, data: bytes, tenant: str, task: str, version: int) -> PrefixArtifact:
        """The blob validated and in the host tier's form (serving dtype, pinned on CUDA)."""
        try:
            return await asyncio.to_thread(self._host_artifact, data)
        except ArtifactError as exc:
            raise InvalidPrefix(f"prefix {tenant}/{task} v{version} does not fit this model: {exc}") from None

    def _host_artifact(self, data: bytes) -> PrefixArtifact:
        # The configured limits, not defaults: what an upload was allowed to store stays servable.
        return self.transfer.to_host(load_artifact(data, self.spec, self.limits))

    async def _resolve_current(self, tenant: str, task: str) -> ResolvedPrefix:
        version = self._current.get((tenant, task))
        if version is not None:
            hit = self._lookup((tenant, task, version))
            if hit is not None:
                return self._found((tenant, task, version), hit)
        key = (tenant, task)
        load = self._loading.get(key)
        if load is None:
            self.stats.misses += 1
            self._notify("miss", "store")
            # The load runs as its own task: a waiter that is cancelled does not cancel it for the others.
            load = asyncio.ensure_future(self._load(tenant, task))
            self._loading[key] = load
            load.add_done_callback(lambda done: self._load_done(key, done))
        return await asyncio.shield(load)

    def _load_done(self, key: tuple[str, str], done: asyncio.Future[ResolvedPrefix]) -> None:
        if self._loading.get(key) is done:  # not a newer load started after a change notification
            del self._loading[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody awaited any more is not logged as lost

    def _lookup(self, key: Key) -> PrefixArtifact | None:
        device_tier, host_tier = self._tiers["device"], self._tiers["host"]
        artifact = device_tier.items.get(key)
        if artifact is not None:
            device_tier.items.move_to_end(key)
            self.stats.hits["device"] += 1
            self._notify("hit", "device")
            return artifact
        artifact = host_tier.items.get(key)
        if artifact is None:
            return None
        host_tier.items.move_to_end(key)
        self.stats.hits["host"] += 1
        self._notify("hit", "host")
        return artifact  # `to_device` promotes it

    async def _load(self, tenant: str, task: str) -> ResolvedPrefix:
        started = time.perf_counter()
        try:
            stored = await self.store.get(tenant, task)
        except TaskNotFound:
            raise UnknownTask(f"tenant {tenant!r} has no task {task!r}") from None
        self._read(tenant, task, stored.data)
        artifact = await self._validated(stored.data, tenant, task, stored.info.version)
        version = stored.info.version
        self.stats.loads += 1
        if self.listener is not None:
            self.listener.on_prefix_load(time.perf_counter() - started)
        if self._loading.get((tenant, task)) is not asyncio.current_task():
            # A change arrived meanwhile: do not cache this read.
            return ResolvedPrefix(version, artifact, on_device=False)
        # A change that raced ahead of this read removed this load from `_loading` (checked above), so
        # what was read here is the store's current version as of now.
        self._current[(tenant, task)] = version
        self._insert_host((tenant, task, version), artifact)
        return ResolvedPrefix(version, artifact, on_device=False)

    def _insert(self, key: Key, artifact: PrefixArtifact) -> None:
        """Into the device tier; what it evicts is demoted to the host tier.

        An evicted entry's copy to the device may still be in flight on the side stream. Demotion
        hands back the host copy it came from; without one it reads the device copy back only after
        that copy's event (`PrefixTransfer.back_to_host`). Both are looked up before any demotion:
        `_insert_host` refreshes the gauges, which forget host copies and events of keys that left the
        device tier, the ones still to be demoted in this loop included.
        """
        evicted = self._tiers["device"].put(key, artifact)
        pending = {
            old_key: (self._host_copies.get(old_key), self._ready.get(old_key)) for old_key, _ in evicted
        }
        for old_key, old in evicted:
            self.stats.evictions["device"] += 1
            self._notify("eviction", "device")
            # Demote, unless a newer version replaced it meanwhile (then it is garbage).
            if self._current.get(old_key[:2]) == old_key[2]:
                host, ready = pending[old_key]
                if host is None:
                    host = self.transfer.back_to_host(DevicePrefix(old, ready))
                self._insert_host(old_key, host)
        self._update_gauges()

    def _insert_host(self, key: Key, artifact: PrefixArtifact) -> None:
        for _ in self._tiers["host"].put(key, artifact, least_recent=key[:2] in self._warming):
            self.stats.evictions["host"] += 1
            self._notify("eviction", "host")
        self._update_gauges()

    # ---- helpers ------------------------------------------------------------------------------
    def _read(self, tenant: str, task: str, data: bytes) -> None:
        """Count a blob read from the store (the metric a warm start is checked by)."""
        reason = "warm" if (tenant, task) in self._warming else "request"
        self.stats.store_reads[reason] = self.stats.store_reads.get(reason, 0) + 1
        if self.listener is not None:
            self.listener.on_store_read(reason, len(data))

    def _notify(self, kind: str, tier: str) -> None:
        if self.listener is not None:
            self.listener.on_cache_event(kind, tier)

    def _update_gauges(self) -> None:
        for name, tier in self._tiers.items():
            self.stats.bytes[name] = tier.nbytes
        device_keys = self._tiers["device"].items
        self._ready = {key: event for key, event in self._ready.items() if key in device_keys}
        self._host_copies = {key: copy for key, copy in self._host_copies.items() if key in device_keys}

    async def warm(self, tenant: str, task: str) -> ResolvedPrefix:
        """`locate` without a request: a store read enters the host tier as least recent, so warming
        the most used tasks first never pushes one of them out for a less used one (the tier's
        budget bounds the memory), and it does not count as a use. Raises what `locate` raises."""
        self._warming.add((tenant, task))
        try:
            found = await self.locate(tenant, task)
        finally:
            self._warming.discard((tenant, task))
            count = self._uses.get((tenant, task), 0) - 1
            if count > 0:
                self._uses[(tenant, task)] = count
            else:
                self._uses.pop((tenant, task), None)
        return found

    def add_uses(self, task: tuple[str, str], n: int) -> None:
        self._uses[task] = self._uses.get(task, 0) + n

    def take_uses(self) -> dict[tuple[str, str], int]:
        """Requests per task since the last call (the engine adds them to the store's counts)."""
        uses, self._uses = self._uses, {}
        return uses

    def resident_tasks(self) -> list[tuple[str, str]]:
        """(tenant, task) pairs with a version in the device tier, sorted."""
        return sorted({key[:2] for key in self._tiers["device"].items})

    def free_bytes(self, tier: str) -> int:
        """What a tier can still take without evicting anything."""
        lru = self._tiers[tier]
        return max(0, lru.budget - lru.nbytes)

    def budget_bytes(self, tier: str) -> int:
        return self._tiers[tier].budget

    def cached_versions(self, tier: str) -> list[Key]:
        """Keys held in a tier, least recently used first (for tests and debugging)."""
        return list(self._tiers[tier].items)

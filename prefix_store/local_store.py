"""`LocalPrefixStore`: the `PrefixStore` on a directory, the embedded default for a single process.

Layout (names are validated, so they are plain path components, never "..", "/" or hidden files):

    {root}/{tenant}/{task}/v{N}.safetensors   the artifact bytes of version N
    {root}/{tenant}/{task}/v{N}.json          JSON of `VersionInfo` (written after the blob)
    {root}/{tenant}/{task}/current            the current version number
    {root}/{tenant}/{task}/seq                the last version number handed out
    {root}/{tenant}/{task}/split              traffic split JSON {"<version>": percent}
    {root}/{tenant}/.deleted                  JSON {"floor": N, "tasks": {task: last version}}

Deleting a task removes its directory and its use count; its last version number goes to the
tenant's `.deleted` tombstone (at most `MAX_TOMBSTONES` names; beyond that the smallest numbers fold
into `floor`), and a new task of that name continues after max(its tombstone, floor). So version
numbers are never reused and a deleted task leaves a bounded record, not a directory (or a use count)
per name ever used.

Data the store did not write (garbage in `current`, a version's JSON, `split`, `seq`; a blob whose
bytes do not match its recorded sha256) is `StoreCorrupt`, for that task only: listings skip it and
name it in `TaskPage.broken`, an upload of a new version repairs it (a garbage `seq` restarts after
the highest version still on disk; a garbage `split` is dropped), and delete removes it.

Every file is written atomically: a temp file in the same directory, fsync, `os.replace`, fsync of
the directory. The order blob -> metadata -> current pointer means a pointer never names a version
whose files are incomplete. Pruning removes metadata before the blob, and readers re-read the
pointer if a version vanishes under them, so reads need no lock.

Files are created 0600 and directories 0700 (the root is tightened to 0700 at start): prefixes are
tenants' trained weights, not for other users of the machine.

Writers of one task serialise on an `asyncio.Lock`; file I/O runs in `asyncio.to_thread`. Safe for
one process only: two processes sharing a directory are not coordinated (use Redis for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from prefix_store.base import (
    ChangeCallback,
    ChangeEvent,
    StoreCorrupt,
    StoredPrefix,
    StoreError,
    TaskInfo,
    TaskNotFound,
    TaskPage,
    VersionInfo,
    VersionNotFound,
    check_stored_bytes,
    parse_stored_info,
    parse_stored_split,
    parse_stored_version,
    validate_name,
)
from prefix_store.traffic import split_to_json, validate_split
from prefix_store.usage import LocalUsage

__all__ = ["LocalPrefixStore"]

logger = logging.getLogger(__name__)

MAX_PAGE_LIMIT = 1000
_VERSION_META_RE = re.compile(r"v([0-9]+)\.json")
_TMP_PREFIX = ".tmp-"
USAGE_FILE = ".usage.json"  # per-task request counts (`prefix_store.usage`); never a tenant's name
_STALE_TMP_S = 3600  # temp files older than this are leftovers of a crashed writer
_READ_ATTEMPTS = 5  # re-reads of the pointer when a concurrent prune removes what it named
_TOMBSTONES = ".deleted"  # per tenant; not a valid task name, so listings never see it
MAX_TOMBSTONES = 1000  # deleted task names remembered per tenant; older ones fold into the floor


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dir(path: Path) -> bool:
    """Create `path` (0700) if missing; True when it was created."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    path.chmod(0o700)  # mkdir's mode is filtered by the umask; chmod is not
    return True


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    return parse_stored_version(text, str(path))


def _read_tombstones(tenant_dir: Path) -> tuple[int, dict[str, int]]:
    """(floor, {task: last version}) of the tenant's deleted tasks; garbage reads as what can be
    salvaged (logged): the floor of a garbled file is unknown, so it is the largest number found."""
    path = tenant_dir / _TOMBSTONES
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0, {}
    try:
        obj = json.loads(raw)
        floor = parse_stored_version(str(obj["floor"]), str(path))
        tasks = {str(k): parse_stored_version(str(v), str(path)) for k, v in obj["tasks"].items()}
        return floor, tasks
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, StoreCorrupt):
        numbers = [int(n) for n in re.findall(rb"[0-9]{1,18}", raw)]
        logger.error(
            "prefix store data corrupt: %s; new tasks continue after %d", path, max(numbers, default=0)
        )
        return max(numbers, default=0), {}


class LocalPrefixStore:
    """`PrefixStore` on a local directory (see the module docstring). Same semantics as Redis."""

    def __init__(self, root: Path, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.root = Path(root)
        self._keep_versions = keep_versions
        # Writers of one task serialise here; an entry lives while someone holds or waits for it
        # (task -> (lock, holders)), so churning task names leaves nothing behind.
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}
        self._tombstone_lock = threading.Lock()  # `.deleted` read-modify-writes (worker threads)
        self._usage_lock = threading.Lock()  # the same for the use counts (flushes and deletes)
        self._callbacks: list[ChangeCallback] = []

    # ---- paths ------------------------------------------------------------------------------

    def _tenant_dir(self, tenant: str) -> Path:
        return self.root / validate_name(tenant, "tenant")

    def _task_dir(self, tenant: str, task: str) -> Path:
        return self._tenant_dir(tenant) / validate_name(task, "task")

    @contextlib.asynccontextmanager
    async def _lock(self, tenant: str, task: str) -> AsyncIterator[None]:
        key = (tenant, task)
        lock, holders = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        holders[0] += 1
        try:
            async with lock:
                yield
        finally:
            holders[0] -= 1
            if holders[0] == 0:
                del self._locks[key]

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:  # disk full, permissions...: not transient like a network error
            raise StoreError(f"local prefix store {op} failed: {e}") from e

    # ---- sync helpers (run in a worker thread) ----------------------------------------------

    @staticmethod
    def _versions_on_disk(task_dir: Path) -> list[int]:
        try:
            names = os.listdir(task_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_META_RE.fullmatch(n)))

    @staticmethod
    def _read_info(task_dir: Path, version: int) -> VersionInfo:
        path = task_dir / f"v{version}.json"
        return parse_stored_info(path.read_bytes(), str(path))

    def _put_sync(self, tenant: str, task: str, data: bytes, metadata: dict[str, Any]) -> VersionInfo:
        task_dir = self._task_dir(tenant, task)
        created = not task_dir.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        _private_dir(task_dir.parent)
        _private_dir(task_dir)
        if created:  # a new directory's entry survives a crash only once its parent is fsynced
            _fsync_dir(task_dir.parent)
            _fsync_dir(self.root)
        # max() with what is on disk guards against a lost seq file; a new task (no counter, or a
        # garbled one) starts after its deleted incarnations (the tombstones) as well.
        on_disk = self._versions_on_disk(task_dir)
        try:
            seq = _read_int(task_dir / "seq")
        except StoreCorrupt:  # logged; restart after every number still known
            seq = None
        deleted: dict[str, int] = {}
        if seq is None:
            floor, deleted = _read_tombstones(task_dir.parent)
            seq = max(floor, deleted.get(task, 0))
        version = max(seq, on_disk[-1] if on_disk else 0) + 1
        atomic_write(task_dir / "seq", f"{version}\n".encode())
        if task in deleted:  # the task's own counter carries on from here
            self._update_tombstones(task_dir.parent, lambda tasks: tasks.pop(task, None))
        info = VersionInfo(
            tenant, task, version, hashlib.sha256(data).hexdigest(), len(data), time.time(), metadata
        )
        atomic_write(task_dir / f"v{version}.safetensors", data)
        atomic_write(task_dir / f"v{version}.json", json.dumps(info.to_json_dict()).encode())
        atomic_write(task_dir / "current", f"{version}\n".encode())
        self._prune_sync(task_dir, current=version)
        return info

    @staticmethod
    def _read_split(task_dir: Path) -> dict[int, int]:
        path = task_dir / "split"
        try:
            return parse_stored_split(path.read_bytes(), str(path))
        except FileNotFoundError:
            return {}

    def _update_tombstones(self, tenant_dir: Path, change: Any) -> None:
        """Apply `change(tasks)` to the tenant's tombstones and write them back, bounded."""
        with self._tombstone_lock:
            floor, tasks = _read_tombstones(tenant_dir)
            change(tasks)
            if len(tasks) > MAX_TOMBSTONES:
                oldest = sorted(tasks, key=tasks.__getitem__)[: len(tasks) - MAX_TOMBSTONES]
                floor = max([floor] + [tasks.pop(name) for name in oldest])
            if floor or tasks:
                atomic_write(tenant_dir / _TOMBSTONES, json.dumps({"floor": floor, "tasks": tasks}).encode())
            else:
                (tenant_dir / _TOMBSTONES).unlink(missing_ok=True)

    def _prune_sync(self, task_dir: Path, current: int) -> None:
        versions = self._versions_on_disk(task_dir)
        try:
            weighted = self._read_split(task_dir)  # a traffic split's versions are never pruned
        except StoreCorrupt:  # logged; unreadable, so it serves nobody: the new version replaces it
            (task_dir / "split").unlink(missing_ok=True)
            weighted = {}
        for old in versions[: max(0, len(versions) - self._keep_versions)]:
            if old != current and old not in weighted:
                # Metadata first: a version without metadata is invisible, a blob without it harmless.
                (task_dir / f"v{old}.json").unlink(missing_ok=True)
                (task_dir / f"v{old}.safetensors").unlink(missing_ok=True)
        now = time.time()
        for p in task_dir.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink()

    def _get_sync(self, tenant: str, task: str, version: int | None) -> StoredPrefix:
        task_dir = self._task_dir(tenant, task)
        for _ in range(_READ_ATTEMPTS):
            current = _read_int(task_dir / "current")
            if current is None:
                raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
            wanted = current if version is None else version
            try:
                info = self._read_info(task_dir, wanted)
                data = (task_dir / f"v{wanted}.safetensors").read_bytes()
            except FileNotFoundError:
                if version is not None:
                    raise VersionNotFound(
                        f"{tenant}/{task} has no version {version} (never created or pruned)"
                    ) from None
                if _read_int(task_dir / "current") == current:  # not a concurrent prune: not ours
                    logger.error("prefix store data corrupt: %s names v%d, whose files are missing",
                                 task_dir / "current", current)  # fmt: skip
                    raise StoreCorrupt("prefix store data is corrupt (see the server log)") from None
                continue  # pruned between reading the pointer and the files: read the pointer again
            check_stored_bytes(info, data, str(task_dir / f"v{wanted}.safetensors"))
            return StoredPrefix(info=info, data=data)
        raise StoreError(f"{tenant}/{task}: current version kept changing; gave up reading")

    def _describe_sync(self, tenant: str, task: str) -> TaskInfo:
        task_dir = self._task_dir(tenant, task)
        for _ in range(_READ_ATTEMPTS):
            current = _read_int(task_dir / "current")
            if current is None:
                raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
            versions = []
            for v in self._versions_on_disk(task_dir):
                # Pruned meanwhile, or an older version's garbled JSON (logged): not listed.
                with contextlib.suppress(FileNotFoundError, StoreCorrupt):
                    versions.append(self._read_info(task_dir, v))
            by_version = {v.version: v for v in versions}
            if current in by_version:
                return TaskInfo(
                    current=by_version[current], versions=versions, split=self._read_split(task_dir)
                )
            if _read_int(task_dir / "current") == current:  # not a concurrent put's prune: corrupt
                with contextlib.suppress(FileNotFoundError):
                    self._read_info(task_dir, current)  # StoreCorrupt (logged) for a garbled one
                logger.error("prefix store data corrupt: %s names version %d, which has no metadata",
                             task_dir / "current", current)  # fmt: skip
                raise StoreCorrupt("prefix store data is corrupt (see the server log)")
        raise StoreError(f"{tenant}/{task}: current version kept changing; gave up reading")

    def _list_sync(self, tenant: str, cursor: str | None, limit: int) -> TaskPage:
        tenant_dir = self._tenant_dir(tenant)
        try:
            names = sorted(n for n in os.listdir(tenant_dir) if (cursor is None or n > cursor))
        except FileNotFoundError:
            names = []
        items: list[VersionInfo] = []
        broken: list[str] = []
        last_name: str | None = None
        for name in names:
            if len(items) + len(broken) == limit:
                # Another name follows; it may be a deleted task, which only costs an empty last page.
                return TaskPage(items=items, next_cursor=last_name, broken=broken)
            try:
                validate_name(name, "task")
            except StoreError:
                continue  # not ours (e.g. a temp file, the tombstones or a stray directory)
            task_dir = tenant_dir / name
            try:
                info = self._listed_info(task_dir)
            except StoreCorrupt:  # logged where found; this task alone is left out
                broken.append(name)
                last_name = name
                continue
            if info is not None:
                items.append(info)
                last_name = name
        return TaskPage(items=items, next_cursor=None, broken=broken)

    def _listed_info(self, task_dir: Path) -> VersionInfo | None:
        """The current version's info, None for no task (deleted meanwhile, a leftover counter)."""
        for _ in range(_READ_ATTEMPTS):
            current = _read_int(task_dir / "current") if task_dir.is_dir() else None
            if current is None:
                return None
            try:
                return self._read_info(task_dir, current)
            except FileNotFoundError:
                continue  # pruned under us by a put: read the pointer again
        logger.error("prefix store data corrupt: %s names a version with no metadata", task_dir / "current")
        raise StoreCorrupt("prefix store data is corrupt (see the server log)")

    def _rollback_sync(self, tenant: str, task: str, version: int) -> VersionInfo:
        task_dir = self._task_dir(tenant, task)
        if not (task_dir / "current").exists():  # a garbled pointer is a task too: this repairs it
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        try:
            info = self._read_info(task_dir, version)
        except FileNotFoundError:
            raise VersionNotFound(
                f"{tenant}/{task} has no version {version} (never created or pruned)"
            ) from None
        if not (task_dir / f"v{version}.safetensors").exists():
            raise VersionNotFound(f"{tenant}/{task} v{version}: blob missing")
        atomic_write(task_dir / "current", f"{version}\n".encode())
        (task_dir / "split").unlink(missing_ok=True)  # rollback (= promote) ends a traffic split
        return info

    def _set_split_sync(self, tenant: str, task: str, split: dict[int, int]) -> int:
        task_dir = self._task_dir(tenant, task)
        current = _read_int(task_dir / "current")
        if current is None:
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        for version in split:
            if not (task_dir / f"v{version}.json").exists():
                raise VersionNotFound(f"{tenant}/{task} has no version {version} (never created or pruned)")
        if split:
            atomic_write(task_dir / "split", json.dumps(split_to_json(split)).encode())
        else:
            (task_dir / "split").unlink(missing_ok=True)
        return current

    def _delete_sync(self, tenant: str, task: str) -> None:
        task_dir = self._task_dir(tenant, task)
        current = task_dir / "current"
        if not current.exists():  # a garbled pointer is still a task: it can be deleted
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        current.unlink()  # the task is gone for readers from here on
        _fsync_dir(task_dir)
        # The tombstone is written before the counter goes: a crash in between leaves both, never neither.
        try:
            seq = _read_int(task_dir / "seq") or 0
        except StoreCorrupt:
            seq = 0
        on_disk = self._versions_on_disk(task_dir)
        last = max(seq, on_disk[-1] if on_disk else 0)

        def remember(tasks: dict[str, int]) -> None:
            tasks[task] = max(last, tasks.get(task, 0))

        self._update_tombstones(task_dir.parent, remember)
        shutil.rmtree(task_dir)
        _fsync_dir(task_dir.parent)
        try:  # the task is gone: its use count goes too (a name that comes and goes leaves nothing)
            with self._usage_lock:
                LocalUsage(self.root / USAGE_FILE).forget(tenant, task, atomic_write)
        except OSError as exc:  # the delete itself is done; a stale count only ranks a warm start
            logger.warning("prefix store: could not drop the use count of %s/%s (%s)", tenant, task, exc)

    def _record_uses_sync(self, uses: dict[tuple[str, str], int]) -> None:
        with self._usage_lock:
            LocalUsage(self.root / USAGE_FILE).record(uses, atomic_write)

    # ---- PrefixStore ------------------------------------------------------------------------

    async def put(self, tenant: str, task: str, data: bytes, metadata: dict[str, Any]) -> VersionInfo:
        """Store `data` as a new version and make it current; notifies subscribers."""
        self._task_dir(tenant, task)  # validate names before anything else
        try:
            metadata = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        async with self._lock(tenant, task):
            with self._errors("put"):
                info = await asyncio.to_thread(self._put_sync, tenant, task, bytes(data), metadata)
        logger.info("stored prefix %s/%s v%d (%d bytes)", tenant, task, info.version, info.size_bytes)
        await self._emit(ChangeEvent(tenant, task, info.version))
        return info

    async def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrefix:
        """The current version's (or `version`'s) info and bytes."""
        self._task_dir(tenant, task)
        with self._errors("get"):
            return await asyncio.to_thread(
                self._get_sync, tenant, task, None if version is None else int(version)
            )

    async def current_version(self, tenant: str, task: str) -> int | None:
        """The current version number, or None if the tenant has no such task."""
        task_dir = self._task_dir(tenant, task)
        with self._errors("current_version"):
            return await asyncio.to_thread(_read_int, task_dir / "current")

    async def describe(self, tenant: str, task: str) -> TaskInfo:
        """The current version and every kept version, ascending."""
        self._task_dir(tenant, task)
        with self._errors("describe"):
            return await asyncio.to_thread(self._describe_sync, tenant, task)

    async def list_tasks(self, tenant: str, cursor: str | None = None, limit: int = 100) -> TaskPage:
        """One page of the tenant's tasks (current version each) in name order, after `cursor`."""
        self._tenant_dir(tenant)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise ValueError(f"limit must be 1-{MAX_PAGE_LIMIT}, got {limit}")
        if cursor is not None:
            validate_name(cursor, "cursor")
        with self._errors("list_tasks"):
            return await asyncio.to_thread(self._list_sync, tenant, cursor, limit)

    async def rollback(self, tenant: str, task: str, version: int) -> VersionInfo:
        """Make `version` (still kept) current again; notifies subscribers."""
        self._task_dir(tenant, task)
        async with self._lock(tenant, task):
            with self._errors("rollback"):
                info = await asyncio.to_thread(self._rollback_sync, tenant, task, int(version))
        logger.info("rolled back prefix %s/%s to v%d", tenant, task, info.version)
        await self._emit(ChangeEvent(tenant, task, info.version))
        return info

    async def delete(self, tenant: str, task: str) -> None:
        """Delete the task and all its versions; notifies subscribers (version None)."""
        self._task_dir(tenant, task)
        async with self._lock(tenant, task):
            with self._errors("delete"):
                await asyncio.to_thread(self._delete_sync, tenant, task)
        logger.info("deleted prefix %s/%s", tenant, task)
        await self._emit(ChangeEvent(tenant, task, None))

    async def set_split(self, tenant: str, task: str, split: dict[int, int]) -> None:
        """Set (or with `{}` end) the task's traffic split; notifies subscribers."""
        self._task_dir(tenant, task)
        split = validate_split(split) if split else {}
        async with self._lock(tenant, task):  # serialised with put's pruning and rollback
            with self._errors("set_split"):
                current = await asyncio.to_thread(self._set_split_sync, tenant, task, split)
        logger.info("traffic split of %s/%s set to %s", tenant, task, split or "none")
        await self._emit(ChangeEvent(tenant, task, current))

    async def get_split(self, tenant: str, task: str) -> dict[int, int]:
        """The task's traffic split ({} when none)."""
        task_dir = self._task_dir(tenant, task)
        with self._errors("get_split"):
            return await asyncio.to_thread(self._read_split, task_dir)

    def subscribe(self, callback: ChangeCallback) -> None:
        """Call `callback(event)` after every change made through this store object."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Nothing to start: changes are reported synchronously by the call that makes them."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Everything below is reachable only through the root: 0700 keeps other users out of stores
        # written before files were created private.
        self.root.chmod(0o700)

    async def close(self) -> None:
        """Nothing to release."""

    async def record_uses(self, uses: dict[tuple[str, str], int]) -> None:
        """Add to the per-task request counts in `usage.json` (`prefix_store.usage`)."""
        with self._errors("record_uses"):
            await asyncio.to_thread(self._record_uses_sync, uses)

    async def most_used(self, limit: int) -> list[tuple[str, str]]:
        with self._errors("most_used"):
            return await asyncio.to_thread(LocalUsage(self.root / USAGE_FILE).most_used, limit)

    async def _emit(self, event: ChangeEvent) -> None:
        for cb in list(self._callbacks):
            try:
                res = cb(event)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                logger.exception("prefix store change callback %r failed for %s", cb, event)

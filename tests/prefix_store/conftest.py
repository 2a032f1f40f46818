"""Fixtures for the prefix store tests: deterministic blobs, a real Redis (127.0.0.1:6379; `make test`
starts one) with a key prefix of its own per test, and `backend`, which runs a test once against
each `PrefixStore` implementation (the conformance suite, `test_store_conformance.py`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from prefix_store.base import PrefixStore
from prefix_store.local_store import LocalPrefixStore
from prefix_store.redis_store import RedisPrefixStore

REDIS_URL = os.environ.get("PREFIXSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes so a torn read would change the digest."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `pred` until true; return the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while True:
        res = pred()
        if not isinstance(res, bool):
            res = await res
        if res:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def redis_admin() -> AsyncIterator[Redis]:
    """A client for looking at (and cleaning up) the test Redis directly."""
    client = Redis.from_url(REDIS_URL, socket_timeout=2.0)
    try:
        await client.ping()
    except Exception as e:  # a missing Redis is a broken environment, not a reason to skip
        pytest.fail(f"no Redis at {REDIS_URL} ({e}); run `make test-services`")
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def fresh_key_prefix(admin: Redis) -> AsyncIterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards, so tests can share a Redis."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await admin.delete(*keys)


@pytest.fixture
async def admin() -> AsyncIterator[Redis]:
    async with redis_admin() as client:
        yield client


@pytest.fixture
async def key_prefix(admin: Redis) -> AsyncIterator[str]:
    async with fresh_key_prefix(admin) as prefix:
        yield prefix


class StoreBackend:
    """One store implementation and a look at its raw storage, so a conformance test can check what a
    store leaves behind without knowing the backend. Stores it opens are closed after the test."""

    name: str

    def __init__(self) -> None:
        self._opened: list[PrefixStore] = []

    def _new(self, keep_versions: int) -> PrefixStore:
        raise NotImplementedError

    def open(self, keep_versions: int = 3) -> PrefixStore:
        """A new store on this test's storage."""
        store = self._new(keep_versions)
        self._opened.append(store)
        return store

    def peer(self, store: PrefixStore) -> PrefixStore:
        """What another server process sees of `store`'s data: a second Redis store on the same keys;
        for the one-process local store, the store itself."""
        return self.open()

    async def task_entries(self, tenant: str, task: str) -> list[str]:
        """The names the backend keeps for one task (files, or keys without the task's key base)."""
        raise NotImplementedError

    async def has_version(self, tenant: str, task: str, version: int) -> bool:
        """Whether any bytes of `version` are still stored (not just listed)."""
        raise NotImplementedError

    async def is_empty(self) -> bool:
        raise NotImplementedError

    async def overwrite(self, tenant: str, task: str, part: str, value: bytes) -> None:
        """Replace one piece of a task's stored data with `value`, as bit rot or a hand edit would:
        `part` is "current", "seq", "split", "meta:N" or "blob:N" (version N)."""
        raise NotImplementedError

    async def close(self) -> None:
        for store in self._opened:
            await store.close()


class LocalBackend(StoreBackend):
    name = "local"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def _new(self, keep_versions: int) -> PrefixStore:
        return LocalPrefixStore(self.root, keep_versions=keep_versions)

    def peer(self, store: PrefixStore) -> PrefixStore:
        return store

    async def task_entries(self, tenant: str, task: str) -> list[str]:
        try:
            return sorted(os.listdir(self.root / tenant / task))
        except FileNotFoundError:
            return []

    async def has_version(self, tenant: str, task: str, version: int) -> bool:
        return any(n.startswith(f"v{version}.") for n in await self.task_entries(tenant, task))

    async def is_empty(self) -> bool:
        return not self.root.exists() or os.listdir(self.root) == []

    async def overwrite(self, tenant: str, task: str, part: str, value: bytes) -> None:
        kind, _, version = part.partition(":")
        name = {"meta": f"v{version}.json", "blob": f"v{version}.safetensors"}.get(kind, kind)
        (self.root / tenant / task / name).write_bytes(value)


class RedisBackend(StoreBackend):
    name = "redis"

    def __init__(self, admin: Redis, key_prefix: str) -> None:
        super().__init__()
        self.admin = admin
        self.key_prefix = key_prefix

    def _new(self, keep_versions: int) -> PrefixStore:
        return RedisPrefixStore(REDIS_URL, key_prefix=self.key_prefix, keep_versions=keep_versions)

    async def task_entries(self, tenant: str, task: str) -> list[str]:
        base = f"{self.key_prefix}:t:{tenant}:task:{task}:"
        return sorted([k.decode().removeprefix(base) async for k in self.admin.scan_iter(match=f"{base}*")])

    async def has_version(self, tenant: str, task: str, version: int) -> bool:
        return any(n.startswith(f"v:{version}:") for n in await self.task_entries(tenant, task))

    async def is_empty(self) -> bool:
        return not [k async for k in self.admin.scan_iter(match=f"{self.key_prefix}:*")]

    async def overwrite(self, tenant: str, task: str, part: str, value: bytes) -> None:
        kind, _, version = part.partition(":")
        suffix = f"v:{version}:{kind}" if version else kind
        key = f"{self.key_prefix}:t:{tenant}:task:{task}:{suffix}"
        if kind == "blob":  # content-addressed: the version names its blob by sha256
            sha = await self.admin.get(f"{self.key_prefix}:t:{tenant}:task:{task}:v:{version}:cas")
            if sha is not None:
                key = f"{self.key_prefix}:blob:{sha.decode()}"
        await self.admin.set(key, value)


@pytest.fixture(params=["local", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    """Each backend in turn, on storage of this test's own (a temporary directory, a key prefix)."""
    async with AsyncExitStack() as stack:
        made: StoreBackend
        if request.param == "local":
            made = LocalBackend(tmp_path / "prefixes")
        else:
            admin = await stack.enter_async_context(redis_admin())
            made = RedisBackend(admin, await stack.enter_async_context(fresh_key_prefix(admin)))
        stack.push_async_callback(made.close)  # stores close before their keys are deleted
        yield made


@pytest.fixture
async def store(backend: StoreBackend) -> PrefixStore:
    return backend.open()

"""RedisPrefixStore against a real Redis (127.0.0.1:6379; .ci/run starts one) and, for the outage
test, a redis-server this file starts and stops itself. Each test uses its own key prefix and
deletes its keys afterwards, so the suite can share a Redis with anything else."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from prefix_store.base import (
    ChangeEvent,
    InvalidName,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
)
from prefix_store.factory import make_store
from prefix_store.local_store import LocalPrefixStore
from prefix_store.redis_store import RedisPrefixStore
from tests.processes import RedisProcess, free_port

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


@pytest.fixture
async def admin() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_timeout=2.0)
    try:
        await client.ping()
    except Exception as e:  # a missing Redis is a broken environment, not a reason to skip
        pytest.fail(f"no Redis at {REDIS_URL} ({e}); start one, e.g. `redis-server --save ''` (see .ci/run)")
    yield client
    await client.aclose()


@pytest.fixture
async def key_prefix(admin: Redis) -> AsyncIterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = [k async for k in admin.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await admin.delete(*keys)


@pytest.fixture
async def stores(key_prefix: str) -> AsyncIterator[Callable[..., RedisPrefixStore]]:
    """Factory of stores on the shared key prefix (each one is like a server replica); all closed after."""
    made: list[RedisPrefixStore] = []

    def make(**kwargs: object) -> RedisPrefixStore:
        kwargs.setdefault("keep_versions", 3)
        s = RedisPrefixStore(REDIS_URL, key_prefix=key_prefix, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def store(stores: Callable[..., RedisPrefixStore]) -> RedisPrefixStore:
    return stores()


async def test_put_get_describe_round_trip(store: RedisPrefixStore) -> None:
    v1 = await store.put("acme", "sum", blob(1000, 1), {"note": "first"})
    v2 = await store.put("acme", "sum", blob(2000, 2), {"note": "second"})
    assert (v1.version, v2.version) == (1, 2)
    assert v2.sha256 == hashlib.sha256(blob(2000, 2)).hexdigest() and v2.size_bytes == 2000

    current = await store.get("acme", "sum")
    assert current.info == v2 and current.data == blob(2000, 2)
    old = await store.get("acme", "sum", version=1)
    assert old.info == v1 and old.data == blob(1000, 1) and old.info.metadata == {"note": "first"}
    assert await store.current_version("acme", "sum") == 2
    assert await store.current_version("acme", "nope") is None

    info = await store.describe("acme", "sum")
    assert info.current == v2 and [v.version for v in info.versions] == [1, 2]
    with pytest.raises(VersionNotFound):
        await store.get("acme", "sum", version=7)
    with pytest.raises(TaskNotFound):
        await store.get("acme", "nope")


async def test_keep_versions_prunes_old_versions_and_their_keys(
    store: RedisPrefixStore, admin: Redis, key_prefix: str
) -> None:
    for i in range(5):
        await store.put("acme", "sum", blob(100 + i, i), {})
    info = await store.describe("acme", "sum")
    assert [v.version for v in info.versions] == [3, 4, 5] and info.current.version == 5
    with pytest.raises(VersionNotFound):
        await store.get("acme", "sum", version=1)
    # The pruned blobs are really gone from Redis, not just unlisted.
    assert not [k async for k in admin.scan_iter(match=f"{key_prefix}:*:v:1:*")]
    assert not [k async for k in admin.scan_iter(match=f"{key_prefix}:*:v:2:*")]


async def test_rollback_moves_current_to_a_kept_version(store: RedisPrefixStore) -> None:
    for i in range(4):
        await store.put("acme", "sum", blob(100 + i, i), {"i": i})
    back = await store.rollback("acme", "sum", 2)
    assert back.version == 2 and back.metadata == {"i": 1}
    got = await store.get("acme", "sum")
    assert got.info.version == 2 and got.data == blob(101, 1)
    with pytest.raises(VersionNotFound):  # pruned (keep_versions=3)
        await store.rollback("acme", "sum", 1)
    with pytest.raises(TaskNotFound):
        await store.rollback("acme", "other", 1)
    # A new put after a rollback becomes current and gets the next number, not 3.
    v5 = await store.put("acme", "sum", blob(50, 5), {})
    assert v5.version == 5 and (await store.get("acme", "sum")).data == blob(50, 5)


async def test_delete_removes_task_and_never_reuses_version_numbers(
    store: RedisPrefixStore, admin: Redis, key_prefix: str
) -> None:
    await store.put("acme", "sum", blob(10), {})
    await store.put("acme", "sum", blob(20), {})
    await store.put("acme", "keep", blob(30), {})
    await store.delete("acme", "sum")

    with pytest.raises(TaskNotFound):
        await store.get("acme", "sum")
    with pytest.raises(TaskNotFound):
        await store.describe("acme", "sum")
    with pytest.raises(TaskNotFound):
        await store.delete("acme", "sum")
    assert await store.current_version("acme", "sum") is None
    assert [i.task for i in (await store.list_tasks("acme")).items] == ["keep"]
    # Only the version counter is left of the deleted task.
    left = sorted([k.decode() async for k in admin.scan_iter(match=f"{key_prefix}:t:acme:task:sum:*")])
    assert left == [f"{key_prefix}:t:acme:task:sum:seq"]

    again = await store.put("acme", "sum", blob(40), {})
    assert again.version == 3  # a cache holding "sum v1" can never mistake the new task for it


async def test_list_tasks_paginates_in_name_order(store: RedisPrefixStore) -> None:
    names = [f"task-{i:02d}" for i in range(25)]
    for n in reversed(names):
        await store.put("acme", n, blob(10, len(n)), {"name": n})
    await store.put("acme", "task-03", blob(11), {})  # v2 of one task: pages show current versions

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_tasks("acme", cursor=cursor, limit=10)
        pages += 1
        seen += [i.task for i in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == names and pages == 3
    by_name = {i.task: i for i in (await store.list_tasks("acme", limit=100)).items}
    assert by_name["task-03"].version == 2 and by_name["task-04"].metadata == {"name": "task-04"}
    assert (await store.list_tasks("nobody")).items == []


async def test_concurrent_puts_of_one_task_give_two_whole_versions(
    stores: Callable[..., RedisPrefixStore],
) -> None:
    a, b = stores(), stores()  # two replicas
    data = {0: blob(300_000, 10), 1: blob(200_000, 11)}
    infos = await asyncio.gather(
        a.put("acme", "sum", data[0], {"w": 0}), b.put("acme", "sum", data[1], {"w": 1})
    )
    assert sorted(i.version for i in infos) == [1, 2]
    for info in infos:
        got = await a.get("acme", "sum", version=info.version)
        assert got.data == data[info.metadata["w"]] and got.info == info
    current = await b.get("acme", "sum")
    assert current.info.version in {1, 2}
    assert current.data == data[current.info.metadata["w"]]


async def test_reader_racing_writer_never_sees_partial_artifact(
    stores: Callable[..., RedisPrefixStore],
) -> None:
    writer, reader = stores(keep_versions=2), stores(keep_versions=2)  # small keep: constant pruning
    await writer.put("acme", "hot", blob(1), {})
    done = False
    num_reads = 0

    async def read_loop() -> None:
        nonlocal num_reads
        while not done:
            got = await reader.get("acme", "hot")
            assert len(got.data) == got.info.size_bytes
            assert hashlib.sha256(got.data).hexdigest() == got.info.sha256
            num_reads += 1

    task = asyncio.create_task(read_loop())
    sizes = [1 + (i * 7919) % 400_000 for i in range(60)]
    for i, size in enumerate(sizes):
        await writer.put("acme", "hot", blob(size, i), {})
        await asyncio.sleep(0)  # let the reader interleave between puts too
    done = True
    await task
    assert num_reads >= 10
    assert (await reader.get("acme", "hot")).data == blob(sizes[-1], len(sizes) - 1)


async def test_second_replica_is_notified_within_one_second(stores: Callable[..., RedisPrefixStore]) -> None:
    a, b = stores(), stores()
    events: list[ChangeEvent] = []
    b.subscribe(events.append)
    await b.start()
    assert b.is_listening

    await a.put("acme", "sum", blob(10), {})
    await wait_until(lambda: ChangeEvent("acme", "sum", 1) in events, 1.0, "b to hear of v1")
    await a.rollback("acme", "sum", 1)
    await a.put("acme", "sum", blob(20), {})
    await wait_until(lambda: ChangeEvent("acme", "sum", 2) in events, 1.0, "b to hear of v2")
    await a.delete("acme", "sum")
    await wait_until(lambda: ChangeEvent("acme", "sum", None) in events, 1.0, "b to hear of the delete")


async def test_change_made_while_listener_was_cut_is_reported_by_resync(
    stores: Callable[..., RedisPrefixStore], admin: Redis
) -> None:
    a = stores()
    # A long periodic interval, so only the reconnect's resync (or a message) can report the change.
    b = stores(resync_interval_s=600.0)
    events: list[ChangeEvent] = []
    b.subscribe(events.append)
    await b.start()
    await a.put("acme", "sum", blob(10), {})
    await a.put("acme", "gone", blob(10), {})
    await wait_until(lambda: len(events) == 2, 1.0, "b to hear of both tasks")

    # Cut b's pub/sub connection server-side, then change things before b's backoff lets it back.
    ids = [c["id"] for c in await admin.client_list(_type="pubsub") if c["name"] == b.listener_client_name]
    assert len(ids) == 1
    await admin.client_kill_filter(_id=ids[0])
    await a.put("acme", "sum", blob(20), {})
    await a.delete("acme", "gone")

    took = await wait_until(
        lambda: ChangeEvent("acme", "sum", 2) in events and ChangeEvent("acme", "gone", None) in events,
        5.0,
        "b to report the changes made while it was disconnected",
    )
    assert b.num_reconnects >= 1 and b.is_listening
    assert took < 5.0


async def test_resync_reports_versions_that_differ_from_what_was_fetched(
    stores: Callable[..., RedisPrefixStore],
) -> None:
    a, b = stores(), stores()  # b never started: no listener, resync by hand
    events: list[ChangeEvent] = []
    b.subscribe(events.append)
    await a.put("acme", "sum", blob(10), {})
    assert (await b.get("acme", "sum")).info.version == 1
    assert await b.resync() == [] and events == []
    await a.put("acme", "sum", blob(20), {})
    assert await b.resync() == [ChangeEvent("acme", "sum", 2)] == events
    assert await b.resync() == []  # reported once


async def test_tenants_cannot_reach_each_others_tasks(stores: Callable[..., RedisPrefixStore]) -> None:
    store = stores()
    b_info = await store.put("tenant-b", "secret", blob(500, 42), {"owner": "b"})
    b_before = await store.describe("tenant-b", "secret")

    assert (await store.list_tasks("tenant-a")).items == []
    with pytest.raises(TaskNotFound):
        await store.get("tenant-a", "secret")
    with pytest.raises(TaskNotFound):
        await store.get("tenant-a", "secret", version=1)
    with pytest.raises(TaskNotFound):
        await store.describe("tenant-a", "secret")
    with pytest.raises(TaskNotFound):
        await store.rollback("tenant-a", "secret", 1)
    with pytest.raises(TaskNotFound):
        await store.delete("tenant-a", "secret")
    # A put under the same task name creates tenant A's own task; B's is untouched.
    a_info = await store.put("tenant-a", "secret", blob(7, 1), {"owner": "a"})
    assert a_info.tenant == "tenant-a" and a_info.version == 1

    got = await store.get("tenant-b", "secret")
    assert got.info == b_info and got.data == blob(500, 42)
    assert await store.describe("tenant-b", "secret") == b_before
    assert [i.tenant for i in (await store.list_tasks("tenant-b")).items] == ["tenant-b"]
    assert (await store.get("tenant-a", "secret")).data == blob(7, 1)


BAD_NAMES = [
    "",
    "a/b",
    "..",
    ".hidden",
    "../etc",
    "a:b",
    "a b",
    "tab\t",
    "nl\n",
    "x" * 65,
    "é",
    "-lead",
    "a*",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_invalid_names_are_refused_before_touching_redis(
    store: RedisPrefixStore, admin: Redis, key_prefix: str, bad: str
) -> None:
    for call in (
        lambda: store.put(bad, "task", b"x", {}),
        lambda: store.put("tenant", bad, b"x", {}),
        lambda: store.get("tenant", bad),
        lambda: store.list_tasks(bad),
        lambda: store.rollback(bad, "task", 1),
        lambda: store.delete("tenant", bad),
    ):
        with pytest.raises(InvalidName, match="tenant|task"):
            await call()
    assert not [k async for k in admin.scan_iter(match=f"{key_prefix}:*")]


def test_make_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(make_store(None, tmp_path), LocalPrefixStore)
    assert isinstance(make_store(REDIS_URL, tmp_path, key_prefix="x"), RedisPrefixStore)


# ---- outage ---------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess(free_port())
    server.start()
    yield server
    server.stop()


async def test_outage_fails_fast_and_the_same_store_recovers(own_redis: RedisProcess) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    # Default timeouts and retries: what a deployment gets.
    a = RedisPrefixStore(url, key_prefix="outage")
    b = RedisPrefixStore(url, key_prefix="outage", resync_interval_s=600.0)
    events: list[ChangeEvent] = []
    b.subscribe(events.append)
    try:
        await b.start()
        await a.put("acme", "sum", blob(10), {})
        await wait_until(lambda: len(events) == 1, 1.0, "b to hear of v1")

        own_redis.stop()
        for op in (
            lambda: a.put("acme", "sum", blob(20), {}),
            lambda: a.get("acme", "sum"),
            lambda: a.current_version("acme", "sum"),
            lambda: a.list_tasks("acme"),
            lambda: a.describe("acme", "sum"),
        ):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await op()
            assert time.monotonic() - start < 5.0
        await wait_until(lambda: not b.is_listening, 5.0, "b's listener to notice the outage")

        own_redis.start()  # same port, empty data (no persistence)
        info = await a.put("acme", "after", blob(30), {})  # the same object works again
        assert (await a.get("acme", "after")).info == info
        await wait_until(lambda: b.is_listening, 10.0, "b's listener to reconnect")
        assert b.num_reconnects >= 1
        await a.put("acme", "after-reconnect", blob(40), {})
        await wait_until(
            lambda: ChangeEvent("acme", "after-reconnect", 1) in events,
            1.0,
            "b to hear of a put after restart",
        )
    finally:
        await a.close()
        await b.close()

"""Traffic splits (canary weights): the pure picker, and one conformance suite run on both stores
(a directory, and the real Redis with two store objects as two replicas)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from prefix_store.base import ChangeEvent, PrefixStore, TaskNotFound, VersionNotFound
from prefix_store.local_store import LocalPrefixStore
from prefix_store.redis_store import RedisPrefixStore
from prefix_store.traffic import InvalidSplit, pick_version, primary_version, validate_split

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_pick_version_serves_each_version_its_percent_and_one_key_one_version() -> None:
    split = {3: 10, 2: 90}
    picks = [pick_version(split, "acme", "sum", f"user-{i}") for i in range(10_000)]
    share = Counter(picks)[3] / len(picks)
    assert 0.09 <= share <= 0.11
    assert all(pick_version(split, "acme", "sum", f"user-{i}") == picks[i] for i in range(500))


def test_raising_the_canary_only_moves_keys_onto_it() -> None:
    keys = [f"k{i}" for i in range(2000)]
    before = {k: pick_version({3: 10, 2: 90}, "t", "x", k) for k in keys}
    after = {k: pick_version({3: 50, 2: 50}, "t", "x", k) for k in keys}
    assert all(after[k] == 3 for k in keys if before[k] == 3)  # nobody on v3 goes back to v2
    assert primary_version({3: 10, 2: 90}) == 2 and primary_version({3: 50, 2: 50}) == 2


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {1: 50},
        {1: 50, 2: 60},
        {"x": 100},
        {0: 100},
        {1: 100.0},
        {1: True},
        dict.fromkeys(range(1, 6), 20),
        # Version keys other than canonical decimal numbers, which int() would have read as versions.
        {"\u0661": 100},  # ARABIC-INDIC DIGIT ONE
        {" 2": 100},
        {"2 ": 100},
        {"1_0": 100},
        {"01": 100},
        {"+1": 100},
        {True: 100},
        {"1" * 19: 100},
        {1.0: 100},
    ],
)
def test_invalid_splits_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidSplit):
        validate_split(bad)


def test_canonical_version_keys_are_accepted() -> None:
    assert validate_split({"3": 10, "12": 90}) == {3: 10, 12: 90}
    assert validate_split({3: 10, 12: 90}) == {3: 10, 12: 90}


@pytest.fixture(params=["local", "redis"])
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[PrefixStore, PrefixStore]]:
    """Two store objects on the same data: two server replicas' views (Redis), or one directory."""
    if request.param == "local":
        store = LocalPrefixStore(tmp_path / "store", keep_versions=2)
        await store.start()
        yield store, store
        return
    prefix = f"test-split-{uuid.uuid4().hex[:10]}"
    a = RedisPrefixStore(REDIS_URL, key_prefix=prefix, keep_versions=2)
    b = RedisPrefixStore(REDIS_URL, key_prefix=prefix, keep_versions=2)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()
    admin = Redis.from_url(REDIS_URL)
    keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


async def test_split_is_kept_with_the_versions_and_seen_by_every_replica(replicas) -> None:
    writer, reader = replicas
    heard: list[ChangeEvent] = []
    reader.subscribe(heard.append)
    for i in range(2):
        await writer.put("acme", "sum", f"blob{i}".encode(), {})
    await writer.set_split("acme", "sum", {2: 10, 1: 90})
    assert await reader.get_split("acme", "sum") == {2: 10, 1: 90}
    assert (await reader.describe("acme", "sum")).split == {2: 10, 1: 90}
    # Pruning keeps the 2 newest (keep_versions) and never drops a weighted version.
    for i in range(3, 6):
        await writer.put("acme", "sum", f"blob{i}".encode(), {})
    assert [v.version for v in (await reader.describe("acme", "sum")).versions] == [1, 2, 4, 5]
    assert (await reader.get("acme", "sum", 1)).data == b"blob0"
    # Rollback (= promote) ends the split in the same step.
    await writer.rollback("acme", "sum", 2)
    assert await reader.get_split("acme", "sum") == {}
    await writer.set_split("acme", "sum", {4: 100})
    await writer.delete("acme", "sum")
    assert await reader.get_split("acme", "sum") == {}
    for _ in range(200):  # Redis: the other replica hears changes over pub/sub
        if any(e.version is None for e in heard):
            break
        await asyncio.sleep(0.01)
    assert ChangeEvent("acme", "sum", 2) in heard and heard[-1].version is None


async def test_a_split_names_only_kept_versions_of_an_existing_task(replicas) -> None:
    store, _ = replicas
    with pytest.raises(TaskNotFound):
        await store.set_split("acme", "nope", {1: 100})
    for i in range(3):
        await store.put("acme", "sum", f"b{i}".encode(), {})  # v1 is pruned (keep 2)
    with pytest.raises(VersionNotFound):
        await store.set_split("acme", "sum", {1: 10, 3: 90})
    with pytest.raises(InvalidSplit):
        await store.set_split("acme", "sum", {2: 10, 3: 80})
    assert await store.get_split("acme", "sum") == {}  # nothing changed
    assert await store.get_split("globex", "sum") == {}  # other tenants see nothing


async def test_redis_resync_reports_a_split_changed_while_the_listener_was_away() -> None:
    prefix = f"test-split-{uuid.uuid4().hex[:10]}"
    store = RedisPrefixStore(REDIS_URL, key_prefix=prefix, keep_versions=2)
    admin = Redis.from_url(REDIS_URL)
    try:
        heard: list[ChangeEvent] = []
        store.subscribe(heard.append)
        await store.put("acme", "sum", b"one", {})
        await store.put("acme", "sum", b"two", {})
        await store.get("acme", "sum")  # this replica serves the task ...
        assert await store.get_split("acme", "sum") == {}  # ... with no split
        assert await store.get_split("acme", "typo") == {} and await store.resync() == []
        # A split written while this replica heard nothing (its pub/sub message lost).
        await admin.set(f"{prefix}:t:acme:task:sum:split", '{"1": 10, "2": 90}')
        assert await store.resync() == [ChangeEvent("acme", "sum", 2)]
        assert heard[-1] == ChangeEvent("acme", "sum", 2)
        assert await store.get_split("acme", "sum") == {1: 10, 2: 90}
        assert await store.resync() == []  # reported once
    finally:
        await store.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()

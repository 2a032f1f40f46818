"""What only RedisPrefixStore does (the shared contract is in `test_store_conformance.py`): change
messages between replicas, resync after a cut listener, and failing fast through an outage. Against a
real Redis (127.0.0.1:6379; `make test` starts one) and, for the outage test, a redis-server this file
starts and stops itself. Each test uses its own key prefix and deletes its keys afterwards."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from prefix_store.base import ChangeEvent, StoreUnavailable
from prefix_store.factory import make_store
from prefix_store.local_store import LocalPrefixStore
from prefix_store.redis_store import RedisPrefixStore
from tests.prefix_store.conftest import REDIS_URL, blob, wait_until
from tests.processes import RedisProcess, free_port


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

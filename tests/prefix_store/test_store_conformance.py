"""The `PrefixStore` contract (docs/architecture.md, "Rules both backends keep"), run against every
backend: the local directory store and the Redis store (a real Redis). What only one backend does
lives in `test_local_store.py` and `test_redis_store.py`."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from prefix_store.base import (
    ChangeEvent,
    InvalidName,
    PrefixStore,
    StoreCorrupt,
    TaskNotFound,
    VersionNotFound,
    validate_name,
)
from tests.prefix_store.conftest import StoreBackend, blob, wait_until


def test_store_satisfies_the_protocol(store: PrefixStore) -> None:
    assert isinstance(store, PrefixStore)


async def test_put_get_describe_round_trip(store: PrefixStore) -> None:
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
        await store.get("acme", "sum", version=9)
    with pytest.raises(TaskNotFound):
        await store.get("acme", "nope")


async def test_keep_versions_prunes_old_versions_and_their_data(
    store: PrefixStore, backend: StoreBackend
) -> None:
    for i in range(5):
        await store.put("acme", "sum", blob(100 + i, i), {"i": i})
    info = await store.describe("acme", "sum")
    assert [v.version for v in info.versions] == [3, 4, 5] and info.current.version == 5
    for pruned in (1, 2):
        with pytest.raises(VersionNotFound):
            await store.get("acme", "sum", version=pruned)
        # The pruned bytes are really gone from the backend, not just unlisted.
        assert not await backend.has_version("acme", "sum", pruned)
    assert await backend.has_version("acme", "sum", 3)


async def test_rollback_moves_current_to_a_kept_version(store: PrefixStore) -> None:
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
    store: PrefixStore, backend: StoreBackend
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
    assert await backend.task_entries("acme", "sum") == []  # nothing: the counter is a tombstone

    again = await store.put("acme", "sum", blob(40), {})
    assert again.version == 3  # a cache holding "sum v1" can never mistake the new task for it


async def test_list_tasks_paginates_in_name_order(store: PrefixStore) -> None:
    names = [f"task-{i:02d}" for i in range(26)]
    for n in reversed(names):
        await store.put("acme", n, blob(10, len(n)), {"name": n})
    await store.put("acme", "task-03", blob(11), {})  # v2 of one task: pages show current versions
    await store.delete("acme", "task-05")  # deleted tasks are skipped, not counted
    expected = [n for n in names if n != "task-05"]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_tasks("acme", cursor=cursor, limit=10)
        assert len(page.items) <= 10
        pages += 1
        seen += [i.task for i in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == expected and pages == 3
    by_name = {i.task: i for i in (await store.list_tasks("acme", limit=100)).items}
    assert by_name["task-03"].version == 2 and by_name["task-04"].metadata == {"name": "task-04"}
    assert (await store.list_tasks("nobody")).items == []


async def test_concurrent_puts_of_one_task_give_two_whole_versions(
    store: PrefixStore, backend: StoreBackend
) -> None:
    other = backend.peer(store)  # two replicas where the backend has them
    data = {0: blob(300_000, 10), 1: blob(200_000, 11)}
    infos = await asyncio.gather(
        store.put("acme", "sum", data[0], {"w": 0}), other.put("acme", "sum", data[1], {"w": 1})
    )
    assert sorted(i.version for i in infos) == [1, 2]
    for info in infos:
        got = await store.get("acme", "sum", version=info.version)
        assert got.data == data[info.metadata["w"]] and got.info == info
    current = await other.get("acme", "sum")
    assert current.info.version in {1, 2} and current.data == data[current.info.metadata["w"]]


async def test_reader_racing_writer_never_sees_partial_artifact(backend: StoreBackend) -> None:
    writer = backend.open(keep_versions=2)  # prune on every put
    reader = backend.peer(writer)
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

    readers = [asyncio.create_task(read_loop()) for _ in range(2)]
    sizes = [1 + (i * 7919) % 400_000 for i in range(60)]
    for i, size in enumerate(sizes):
        await writer.put("acme", "hot", blob(size, i), {})
        await asyncio.sleep(0)  # let the readers interleave between puts too
    done = True
    await asyncio.gather(*readers)
    assert num_reads >= 10
    assert (await reader.get("acme", "hot")).data == blob(sizes[-1], len(sizes) - 1)


async def test_subscribers_hear_of_every_change(store: PrefixStore) -> None:
    events: list[ChangeEvent] = []
    async_events: list[ChangeEvent] = []

    def broken(event: ChangeEvent) -> None:
        raise RuntimeError("a buggy subscriber must not stop the others")

    async def async_cb(event: ChangeEvent) -> None:
        async_events.append(event)

    store.subscribe(broken)
    store.subscribe(events.append)
    store.subscribe(async_cb)
    await store.start()
    await store.put("acme", "sum", blob(1), {})
    await store.put("acme", "sum", blob(2), {})
    await store.rollback("acme", "sum", 1)
    await store.delete("acme", "sum")
    expected = [ChangeEvent("acme", "sum", v) for v in (1, 2, 1, None)]
    await wait_until(lambda: len(events) >= 4 and len(async_events) >= 4, 2.0, "all four changes")
    assert events == expected and async_events == expected


async def test_tenants_cannot_reach_each_others_tasks(store: PrefixStore) -> None:
    b_info = await store.put("tenant-b", "secret", blob(500, 42), {"owner": "b"})
    b_before = await store.describe("tenant-b", "secret")

    assert (await store.list_tasks("tenant-a")).items == []
    for call in (
        lambda: store.get("tenant-a", "secret"),
        lambda: store.get("tenant-a", "secret", version=1),
        lambda: store.describe("tenant-a", "secret"),
        lambda: store.rollback("tenant-a", "secret", 1),
        lambda: store.delete("tenant-a", "secret"),
    ):
        with pytest.raises(TaskNotFound):
            await call()
    # A put under the same task name creates tenant A's own task; B's is untouched.
    a_info = await store.put("tenant-a", "secret", blob(7, 1), {"owner": "a"})
    assert a_info.tenant == "tenant-a" and a_info.version == 1

    got = await store.get("tenant-b", "secret")
    assert got.info == b_info and got.data == blob(500, 42)
    assert await store.describe("tenant-b", "secret") == b_before
    assert [i.tenant for i in (await store.list_tasks("tenant-b")).items] == ["tenant-b"]
    assert (await store.get("tenant-a", "secret")).data == blob(7, 1)


# Path and key separators, glob characters, control characters, too long, non-ASCII, a leading dash.
BAD_NAMES = ["", "a/b", "..", ".hidden", "../etc", "a:b", "a b", "tab\t", "nl\n", "x" * 65, "é", "-lead"]
BAD_NAMES += ["a\\b", "a*"]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_invalid_names_are_refused_before_touching_storage(
    store: PrefixStore, backend: StoreBackend, bad: str
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
    assert await backend.is_empty()


def test_validate_name_accepts_the_documented_alphabet() -> None:
    for good in ["a", "A9", "sum-v2.final_1", "x" * 64, "0"]:
        assert validate_name(good) == good
    with pytest.raises(InvalidName, match="1-64"):
        validate_name("x" * 65, "task")
    with pytest.raises(InvalidName, match="string"):
        validate_name(None, "tenant")


@pytest.mark.parametrize(
    ("part", "garbage"),
    [
        ("current", "\u0661".encode() + b"9" * 50),
        ("current", b"7"),  # a number, but of a version that was never written
        ("meta:1", b"\x00{not json"),
    ],
)
async def test_a_corrupt_task_fails_alone_and_a_new_version_repairs_it(
    store: PrefixStore, backend: StoreBackend, part: str, garbage: bytes
) -> None:
    for name in ("alpha", "bad", "zeta"):
        await store.put("acme", name, blob(100, len(name)), {"name": name})
    await backend.overwrite("acme", "bad", part, garbage)

    with pytest.raises(StoreCorrupt):
        await store.get("acme", "bad")
    with pytest.raises(StoreCorrupt):
        await store.describe("acme", "bad")
    page = await store.list_tasks("acme")
    assert [i.task for i in page.items] == ["alpha", "zeta"] and page.broken == ["bad"]
    first = await store.list_tasks("acme", limit=2)  # a broken task takes its place on a page
    assert [i.task for i in first.items] == ["alpha"] and first.broken == ["bad"]
    assert [i.task for i in (await store.list_tasks("acme", first.next_cursor)).items] == ["zeta"]
    assert (await store.put("acme", "other", blob(10), {})).version == 1  # other names upload
    assert (await store.get("acme", "zeta")).data == blob(100, 4)

    repaired = await store.put("acme", "bad", blob(200, 9), {})
    assert repaired.version == 2
    assert (await store.get("acme", "bad")).data == blob(200, 9)
    assert (await store.describe("acme", "bad")).current.version == 2
    page = await store.list_tasks("acme")
    assert [i.task for i in page.items] == ["alpha", "bad", "other", "zeta"] and page.broken == []


async def test_a_corrupt_task_can_be_deleted(store: PrefixStore, backend: StoreBackend) -> None:
    await store.put("acme", "bad", blob(100), {})
    await backend.overwrite("acme", "bad", "current", b"garbage")
    await store.delete("acme", "bad")
    page = await store.list_tasks("acme")
    assert page.items == [] and page.broken == []
    assert (await store.put("acme", "bad", blob(10), {})).version == 2  # never reused


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_damaged_blob_is_store_corrupt_never_served(
    store: PrefixStore, backend: StoreBackend, damage: str
) -> None:
    await store.put("acme", "sum", blob(1000, 1), {})
    await store.put("acme", "sum", blob(1000, 2), {})
    data = bytearray(blob(1000, 2))
    if damage == "flip":
        data[500] ^= 0x01
    else:
        del data[600:]
    await backend.overwrite("acme", "sum", "blob:2", bytes(data))
    with pytest.raises(StoreCorrupt):
        await store.get("acme", "sum")
    assert (await store.get("acme", "sum", version=1)).data == blob(1000, 1)  # the rest still serves
    assert [i.version for i in (await store.list_tasks("acme")).items] == [2]  # listing needs no blob


async def test_garbage_traffic_split_is_store_corrupt_and_a_new_version_drops_it(
    store: PrefixStore, backend: StoreBackend
) -> None:
    await store.put("acme", "sum", blob(100, 1), {})
    await store.put("acme", "sum", blob(100, 2), {})
    for garbage in (b"{not json", b"[1, 2]", b'{"\u0661": 100}', b'{"1": 50}', b'{"1": "100"}'):
        await backend.overwrite("acme", "sum", "split", garbage)
        with pytest.raises(StoreCorrupt):
            await store.get_split("acme", "sum")
        with pytest.raises(StoreCorrupt):
            await store.describe("acme", "sum")
    assert (await store.get("acme", "sum")).info.version == 2  # the current version is intact
    await store.put("acme", "sum", blob(100, 3), {})
    assert await store.get_split("acme", "sum") == {}
    assert (await store.describe("acme", "sum")).split == {}


async def test_garbage_version_counter_restarts_after_every_known_version(
    store: PrefixStore, backend: StoreBackend
) -> None:
    for i in range(3):
        await store.put("acme", "sum", blob(100, i), {})
    await backend.overwrite("acme", "sum", "seq", b"not a number")
    assert (await store.put("acme", "sum", blob(100, 9), {})).version == 4
    assert (await store.put("acme", "sum", blob(100, 10), {})).version == 5


async def test_deleted_names_leave_a_bounded_record_and_versions_are_never_reused(
    backend: StoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefix_store.local_store
    import prefix_store.redis_store

    for module in (prefix_store.local_store, prefix_store.redis_store):
        monkeypatch.setattr(module, "MAX_TOMBSTONES", 3)
    store = backend.open()
    await store.put("acme", "live", blob(10), {})
    last: list[int] = []
    for i in range(6):  # six names, each with a few versions, then deleted
        for _ in range(2):
            version = (await store.put("acme", f"t{i}", blob(10, i), {})).version
        last.append(version)
        await store.delete("acme", f"t{i}")
        assert await backend.task_entries("acme", f"t{i}") == []
    # Three tombstones are kept: the fourth delete folded t0's 2 into the floor, so t4 and t5 began
    # at 3; the floor is 2 (t0, t1, t2 folded), t3, t4, t5 are remembered.
    assert last == [2, 2, 2, 2, 4, 4]
    assert (await store.put("acme", "t5", blob(10), {})).version == 5  # from its own number
    assert (await store.put("acme", "t0", blob(10), {})).version == 3  # from the floor, never 1 or 2
    assert (await store.put("acme", "brand-new", blob(10), {})).version == 3
    assert (await store.put("acme", "t3", blob(10), {})).version == 3
    assert (await store.put("acme", "live", blob(10), {})).version == 2  # a live task keeps counting

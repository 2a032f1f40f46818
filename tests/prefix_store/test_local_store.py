"""LocalPrefixStore on a temporary directory: the same behaviours as the Redis store, plus the on-disk
layout and atomic-write guarantees a single-process deployment relies on."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from prefix_store.base import (
    ChangeEvent,
    InvalidName,
    PrefixStore,
    StoreError,
    TaskNotFound,
    VersionNotFound,
    validate_name,
)
from prefix_store.local_store import LocalPrefixStore


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes so a torn read would change the digest."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture
async def store(tmp_path: Path) -> LocalPrefixStore:
    s = LocalPrefixStore(tmp_path / "prefixes", keep_versions=3)
    await s.start()
    return s


def test_local_store_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(LocalPrefixStore(tmp_path), PrefixStore)


async def test_put_get_describe_round_trip_and_layout(store: LocalPrefixStore) -> None:
    v1 = await store.put("acme", "sum", blob(1000, 1), {"note": "first"})
    v2 = await store.put("acme", "sum", blob(2000, 2), {"note": "second"})
    assert (v1.version, v2.version) == (1, 2)
    assert v2.sha256 == hashlib.sha256(blob(2000, 2)).hexdigest() and v2.size_bytes == 2000

    current = await store.get("acme", "sum")
    assert current.info == v2 and current.data == blob(2000, 2)
    old = await store.get("acme", "sum", version=1)
    assert old.info == v1 and old.data == blob(1000, 1)
    assert await store.current_version("acme", "sum") == 2
    assert await store.current_version("acme", "nope") is None
    info = await store.describe("acme", "sum")
    assert info.current == v2 and [v.version for v in info.versions] == [1, 2]
    with pytest.raises(VersionNotFound):
        await store.get("acme", "sum", version=9)
    with pytest.raises(TaskNotFound):
        await store.get("acme", "nope")

    # The documented layout, and no temp files left behind by the atomic writes.
    task_dir = store.root / "acme" / "sum"
    assert sorted(os.listdir(task_dir)) == [
        "current",
        "seq",
        "v1.json",
        "v1.safetensors",
        "v2.json",
        "v2.safetensors",
    ]
    assert (task_dir / "current").read_text().strip() == "2"
    assert (task_dir / "v2.safetensors").read_bytes() == blob(2000, 2)


async def test_keep_versions_prunes_and_rollback_needs_a_kept_version(store: LocalPrefixStore) -> None:
    for i in range(5):
        await store.put("acme", "sum", blob(100 + i, i), {"i": i})
    info = await store.describe("acme", "sum")
    assert [v.version for v in info.versions] == [3, 4, 5]
    assert not (store.root / "acme" / "sum" / "v1.safetensors").exists()
    with pytest.raises(VersionNotFound):
        await store.get("acme", "sum", version=2)

    back = await store.rollback("acme", "sum", 3)
    assert back.version == 3 and (await store.get("acme", "sum")).data == blob(102, 2)
    with pytest.raises(VersionNotFound):
        await store.rollback("acme", "sum", 1)
    with pytest.raises(TaskNotFound):
        await store.rollback("acme", "other", 1)
    assert (await store.put("acme", "sum", blob(7), {})).version == 6


async def test_delete_removes_task_and_never_reuses_version_numbers(store: LocalPrefixStore) -> None:
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
    assert os.listdir(store.root / "acme" / "sum") == ["seq"]  # only the counter is left
    assert (await store.put("acme", "sum", blob(40), {})).version == 3


async def test_list_tasks_paginates_in_name_order(store: LocalPrefixStore) -> None:
    names = [f"task-{i:02d}" for i in range(25)]
    for n in reversed(names):
        await store.put("acme", n, blob(10), {"name": n})
    await store.delete("acme", "task-05")  # deleted tasks are skipped, not counted
    expected = [n for n in names if n != "task-05"]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_tasks("acme", cursor=cursor, limit=10)
        assert len(page.items) <= 10
        seen += [i.task for i in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == expected
    assert (await store.list_tasks("nobody")).items == []


async def test_concurrent_puts_of_one_task_give_two_whole_versions(store: LocalPrefixStore) -> None:
    data = {0: blob(300_000, 10), 1: blob(200_000, 11)}
    infos = await asyncio.gather(
        store.put("acme", "sum", data[0], {"w": 0}), store.put("acme", "sum", data[1], {"w": 1})
    )
    assert sorted(i.version for i in infos) == [1, 2]
    for info in infos:
        assert (await store.get("acme", "sum", version=info.version)).data == data[info.metadata["w"]]
    current = await store.get("acme", "sum")
    assert current.info.version in {1, 2} and current.data == data[current.info.metadata["w"]]


async def test_reader_racing_writer_never_sees_partial_artifact(tmp_path: Path) -> None:
    store = LocalPrefixStore(tmp_path, keep_versions=1)  # prune on every put
    await store.put("acme", "hot", blob(1), {})
    done = False
    num_reads = 0

    async def read_loop() -> None:
        nonlocal num_reads
        while not done:
            got = await store.get("acme", "hot")
            assert len(got.data) == got.info.size_bytes
            assert hashlib.sha256(got.data).hexdigest() == got.info.sha256
            num_reads += 1

    readers = [asyncio.create_task(read_loop()) for _ in range(2)]
    sizes = [1 + (i * 7919) % 200_000 for i in range(40)]
    for i, size in enumerate(sizes):
        await store.put("acme", "hot", blob(size, i), {})
    done = True
    await asyncio.gather(*readers)
    assert num_reads >= 10


async def test_subscribers_hear_of_every_change(store: LocalPrefixStore) -> None:
    events: list[ChangeEvent] = []
    async_events: list[ChangeEvent] = []

    def broken(event: ChangeEvent) -> None:
        raise RuntimeError("a buggy subscriber must not stop the others")

    async def async_cb(event: ChangeEvent) -> None:
        async_events.append(event)

    store.subscribe(broken)
    store.subscribe(events.append)
    store.subscribe(async_cb)
    await store.put("acme", "sum", blob(1), {})
    await store.put("acme", "sum", blob(2), {})
    await store.rollback("acme", "sum", 1)
    await store.delete("acme", "sum")
    expected = [ChangeEvent("acme", "sum", v) for v in (1, 2, 1, None)]
    assert events == expected and async_events == expected


async def test_tenants_cannot_reach_each_others_tasks(store: LocalPrefixStore) -> None:
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
    assert (await store.put("tenant-a", "secret", blob(7), {})).tenant == "tenant-a"

    got = await store.get("tenant-b", "secret")
    assert got.info == b_info and got.data == blob(500, 42)
    assert await store.describe("tenant-b", "secret") == b_before


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
    "a\\b",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_invalid_names_are_refused_before_touching_disk(store: LocalPrefixStore, bad: str) -> None:
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
    assert os.listdir(store.root) == []


def test_validate_name_accepts_the_documented_alphabet() -> None:
    for good in ["a", "A9", "sum-v2.final_1", "x" * 64, "0"]:
        assert validate_name(good) == good
    with pytest.raises(InvalidName, match="1-64"):
        validate_name("x" * 65, "task")
    with pytest.raises(InvalidName, match="string"):
        validate_name(None, "tenant")


async def test_corrupted_blob_is_reported_not_served(store: LocalPrefixStore) -> None:
    await store.put("acme", "sum", blob(100), {})
    (store.root / "acme" / "sum" / "v1.safetensors").write_bytes(blob(100, 99))  # bit rot / manual edit
    with pytest.raises(StoreError, match="sha256"):
        await store.get("acme", "sum")


async def test_leftover_temp_files_are_invisible(store: LocalPrefixStore) -> None:
    await store.put("acme", "sum", blob(10), {})
    # What a writer killed mid-write leaves behind.
    (store.root / "acme" / "sum" / ".tmp-dead-v2.safetensors").write_bytes(b"partial")
    (store.root / "acme" / ".tmp-dead-x").write_bytes(b"partial")
    assert [i.task for i in (await store.list_tasks("acme")).items] == ["sum"]
    assert [v.version for v in (await store.describe("acme", "sum")).versions] == [1]
    assert (await store.put("acme", "sum", blob(20), {})).version == 2


async def test_put_of_a_new_task_makes_its_new_directories_durable(
    store: LocalPrefixStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefix_store.local_store as local_store

    synced: list[Path] = []
    real = local_store._fsync_dir

    def record(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(local_store, "_fsync_dir", record)
    await store.put("new-tenant", "new-task", b"blob", {})
    # Without fsyncing the parents, a crash could lose the whole acknowledged task directory.
    assert store.root / "new-tenant" in synced and store.root in synced

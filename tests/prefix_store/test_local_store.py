"""What only LocalPrefixStore does (the shared contract is in `test_store_conformance.py`): the
on-disk layout, sha256 checks on read, and the atomic, durable writes a single-process deployment
relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefix_store.base import StoreCorrupt
from prefix_store.local_store import LocalPrefixStore
from tests.prefix_store.conftest import blob


@pytest.fixture
async def store(tmp_path: Path) -> LocalPrefixStore:
    s = LocalPrefixStore(tmp_path / "prefixes", keep_versions=3)
    await s.start()
    return s


async def test_files_follow_the_documented_layout(store: LocalPrefixStore) -> None:
    await store.put("acme", "sum", blob(1000, 1), {"note": "first"})
    await store.put("acme", "sum", blob(2000, 2), {"note": "second"})
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


async def test_corrupted_blob_is_reported_not_served(store: LocalPrefixStore) -> None:
    await store.put("acme", "sum", blob(100), {})
    (store.root / "acme" / "sum" / "v1.safetensors").write_bytes(blob(100, 99))  # bit rot / manual edit
    with pytest.raises(StoreCorrupt):  # a 503 for this task, its path and reason in the log
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

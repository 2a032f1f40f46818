"""The store sized for a fleet: content-addressed blobs (identical bytes stored once), per-task use
counts (warm starts), prefixes kept in the dtype they are served in, Sentinel URLs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from modeling.models import load_model
from prefix_store.artifact import dump_artifact, load_artifact, new_artifact
from prefix_store.artifact_types import ArtifactError
from prefix_store.base import InvalidName, PrefixStore, StoreUnavailable
from prefix_store.redis_connect import parse_sentinel_url
from prefix_store.redis_store import RedisPrefixStore
from prefix_store.uploads import ArtifactUploadChecks
from tests.prefix_store.conftest import REDIS_URL, StoreBackend, blob


@pytest.fixture
async def open_store(key_prefix: str) -> AsyncIterator[Callable[..., RedisPrefixStore]]:
    """Factory of RedisPrefixStores on this test's key prefix, closed after the test."""
    opened: list[RedisPrefixStore] = []

    def make(keep_versions: int = 5, **kwargs: Any) -> RedisPrefixStore:
        opened.append(
            RedisPrefixStore(REDIS_URL, key_prefix=key_prefix, keep_versions=keep_versions, **kwargs)
        )
        return opened[-1]

    yield make
    for store in opened:
        await store.close()


async def blob_keys(admin: Redis, key_prefix: str) -> list[str]:
    return sorted([k.decode() async for k in admin.scan_iter(match=f"{key_prefix}:blob:*")])


async def test_identical_blobs_are_stored_once_and_freed_with_their_last_version(
    admin: Redis, key_prefix: str, open_store: Callable[..., RedisPrefixStore]
) -> None:
    store = open_store(1)
    data = blob(200_000, seed=1)
    a = await store.put("acme", "sql", data, {})
    b = await store.put("globex", "sql-copy", data, {})  # another tenant, same bytes
    assert a.sha256 == b.sha256
    assert await blob_keys(admin, key_prefix) == [
        f"{key_prefix}:blob:{a.sha256}",
        f"{key_prefix}:blob:{a.sha256}:refs",
    ]
    assert int(await admin.get(f"{key_prefix}:blob:{a.sha256}:refs")) == 2
    assert (await admin.memory_usage(f"{key_prefix}:blob:{a.sha256}")) >= len(data)

    await store.delete("acme", "sql")  # one reference left: the other tenant still reads it
    assert (await store.get("globex", "sql-copy")).data == data
    other = await store.put("globex", "sql-copy", blob(1000, seed=2), {})  # prunes v1 (keep 1)
    assert await blob_keys(admin, key_prefix) == [
        f"{key_prefix}:blob:{other.sha256}", f"{key_prefix}:blob:{other.sha256}:refs"
    ]  # fmt: skip
    await store.delete("globex", "sql-copy")
    assert await blob_keys(admin, key_prefix) == []


async def test_a_second_upload_of_the_same_bytes_sends_nothing_and_counts_reads(
    admin: Redis, key_prefix: str, open_store: Callable[..., RedisPrefixStore]
) -> None:
    store = open_store()
    data = blob(100_000, seed=3)
    await store.put("acme", "a", data, {})
    # Make the stored copy distinguishable: a second put must not rewrite it.
    sha = (await store.get("acme", "a")).info.sha256
    await admin.setrange(f"{key_prefix}:blob:{sha}", 0, b"X")
    await store.put("acme", "b", data, {})
    assert (await admin.getrange(f"{key_prefix}:blob:{sha}", 0, 0)) == b"X"
    # Put the stored byte back: a read checks the bytes against their sha256 and never serves a
    # changed blob.
    await admin.setrange(f"{key_prefix}:blob:{sha}", 0, data[:1])
    reads = store.blob_reads, store.blob_read_bytes
    await store.get("acme", "b")
    assert (store.blob_reads, store.blob_read_bytes) == (reads[0] + 1, reads[1] + len(data))


async def test_versions_written_before_content_addressing_still_read_and_prune(
    admin: Redis, key_prefix: str, open_store: Callable[..., RedisPrefixStore]
) -> None:
    store = open_store(1)
    data = blob(5000, seed=4)
    info = await store.put("acme", "old", data, {})
    base = f"{key_prefix}:t:acme:task:old:v:{info.version}"
    # Rewrite it the way the previous layout stored it: the bytes under the version's own key.
    await admin.set(f"{base}:blob", data)
    await admin.delete(
        f"{base}:cas", f"{key_prefix}:blob:{info.sha256}", f"{key_prefix}:blob:{info.sha256}:refs"
    )
    assert (await store.get("acme", "old")).data == data
    await store.put("acme", "old", blob(10, seed=5), {})  # prunes the old-layout version
    assert not await admin.exists(f"{base}:blob")


async def test_use_counts_rank_tasks_for_warm_starts(backend: StoreBackend) -> None:
    store: PrefixStore = backend.open()
    await store.start()
    assert await store.most_used(10) == []
    await store.record_uses({("acme", "sql"): 3, ("acme", "poems"): 1})
    await store.record_uses({("globex", "sql"): 2, ("acme", "poems"): 4, ("acme", "zero"): 0})
    assert await store.most_used(10) == [("acme", "poems"), ("acme", "sql"), ("globex", "sql")]
    assert await store.most_used(1) == [("acme", "poems")]
    assert await store.most_used(0) == []
    with pytest.raises(ValueError):
        await store.most_used(1001)
    with pytest.raises(InvalidName):
        await store.record_uses({("acme", "../x"): 1})
    assert await backend.peer(store).most_used(1) == [("acme", "poems")]  # shared by replicas


def test_sentinel_urls_are_parsed_and_bad_ones_refused() -> None:
    address = parse_sentinel_url(
        "redis+sentinel://:s3cret@s1:26379,s2:26380,s3/prefixes/2?sentinel_password=x"
    )
    assert address is not None
    assert address.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (address.service_name, address.db, address.password, address.sentinel_password) == (
        "prefixes",
        2,
        "s3cret",
        "x",
    )
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    for bad in (
        "redis+sentinel:///svc",
        "redis+sentinel://h:1",
        "redis+sentinel://h:x/svc",
        "redis+sentinel://h/svc/db",
        "redis+sentinel://h/svc?pw=1",
    ):
        with pytest.raises(ValueError) as info:
            parse_sentinel_url(bad)
        assert "s3cret" not in str(info.value)


@pytest.fixture(scope="module")
def spec(tiny_gpt2_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(str(tiny_gpt2_dir), device="cpu", dtype="float32").spec


def artifact_in(spec, dtype: torch.dtype, scale: float = 1.0) -> bytes:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(spec.num_layers, 2, spec.num_heads, 64, spec.head_dim, generator=g) * scale
    return dump_artifact(new_artifact({"decoder": prefix.to(dtype)}, spec, task="t"))


def test_a_bfloat16_blob_is_half_the_bytes_of_the_float32_one(spec) -> None:  # type: ignore[no-untyped-def]
    fp32, bf16 = artifact_in(spec, torch.float32), artifact_in(spec, torch.bfloat16)
    tensor_bytes = spec.num_layers * 2 * spec.num_heads * 64 * spec.head_dim * 4
    # Kept as uploaded on a float32 server: bfloat16 stays bfloat16.
    kept = ArtifactUploadChecks(torch.float32).artifact(bf16, spec, None)
    assert kept.data == bf16 and kept.summary["dtype"] == "BF16"
    # On a bfloat16 server a float32 upload is stored in bfloat16: the same bytes as a bf16 upload.
    narrowed = ArtifactUploadChecks(torch.bfloat16).artifact(fp32, spec, None)
    assert narrowed.summary["dtype"] == "BF16"
    assert len(narrowed.data) == len(bf16)
    assert abs(len(fp32) - tensor_bytes) < 1024 and abs(len(narrowed.data) - tensor_bytes // 2) < 1024
    # Same served values: casting the stored blob to the serving dtype is what casting the upload gives.
    served = load_artifact(narrowed.data, spec).prefixes["decoder"]
    assert torch.equal(served, load_artifact(fp32, spec).prefixes["decoder"].to(torch.bfloat16))
    # Off (None): kept as uploaded.
    assert ArtifactUploadChecks(None).artifact(fp32, spec, None).data == fp32


def test_a_float32_prefix_that_overflows_the_serving_dtype_is_refused(spec) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactError, match="overflow"):
        ArtifactUploadChecks(torch.float16).artifact(artifact_in(spec, torch.float32, scale=1e6), spec, None)


async def test_a_write_no_replica_acknowledged_is_not_reported_as_done(
    open_store: Callable[..., RedisPrefixStore],
) -> None:
    # The test Redis has no replicas: with min_replicas=1 no write can be acknowledged.
    plain = open_store()
    await plain.put("acme", "sql", blob(100, seed=1), {})
    store = open_store(min_replicas=1, replication_timeout_s=0.2)
    for write in (
        lambda: store.put("acme", "sql", blob(100, seed=2), {}),
        lambda: store.rollback("acme", "sql", 1),
        lambda: store.set_split("acme", "sql", {}),
        lambda: store.delete("acme", "sql"),
    ):
        with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
            await write()

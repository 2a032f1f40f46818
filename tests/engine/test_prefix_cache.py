"""The tiered prefix cache over a real LocalPrefixStore: single-flight loads, versions, LRU, outages."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import pytest
import torch

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact, dump_artifact
from server.engine import GenerationRequest, InvalidPrefix, StoreUnavailable, UnknownTask
from server.engine.prefix_cache import PrefixCache
from server.engine.prefix_transfer import DevicePrefix, PrefixTransfer
from server.limits import Limits
from tests.engine.conftest import PeftReference, collect, greedy, random_artifact

PROMPT = "Once upon a time, in a land far away,"


def cache_for(
    store: Any, tiny: LoadedModel, device_bytes: int = 1 << 30, host_bytes: int = 1 << 30
) -> PrefixCache:
    limits = Limits(device_prefix_cache_bytes=device_bytes, host_prefix_cache_bytes=host_bytes)
    cache = PrefixCache(store, tiny.spec, tiny.device, tiny.dtype, limits)
    cache.start()
    return cache


async def test_concurrent_requests_for_an_uncached_task_load_it_once(make_engine: Any, store: Any) -> None:
    store.get_delay_s = 0.05  # a slow store, so all requests arrive while the load is in flight
    async with make_engine(store) as engine:
        results = await asyncio.gather(
            *(
                collect(engine, GenerationRequest(f"r{i}", PROMPT, greedy(3), task="task-10"))
                for i in range(12)
            )
        )
        assert store.get_calls == 1
        assert len({tuple(e.token_id for e in events) for events in results}) == 1
        stats = engine.prefix_cache_stats
        assert stats is not None and stats.misses == 1 and stats.loads == 1
        await collect(engine, GenerationRequest("later", PROMPT, greedy(2), task="task-10"))
        assert store.get_calls == 1 and stats.hits["device"] == 1


async def test_new_version_mid_generation(
    make_engine: Any,
    store: Any,
    peft_ref: PeftReference,
    tiny: LoadedModel,
    artifacts: dict[int, PrefixArtifact],
) -> None:
    old = artifacts[5]
    new = random_artifact(tiny.spec, 7, seed=4242)
    prompt_ids = tiny.tokenizer.encode(PROMPT)
    async with make_engine(store) as engine:
        running = engine.generate(GenerationRequest("old", PROMPT, greedy(12), task="task-5"))
        events = [await running.__anext__()]
        info = await store.inner.put("default", "task-5", dump_artifact(new), {})  # notifies the cache
        assert info.version == 2
        after = await collect(engine, GenerationRequest("new", PROMPT, greedy(12), task="task-5"))
        events += [e async for e in running]
        assert engine.prefix_cache is not None
        assert engine.prefix_cache.cached_versions("device") == [("default", "task-5", 2)]
    assert {e.prefix_version for e in events} == {1} and {e.prefix_version for e in after} == {2}
    assert [e.token_id for e in events] == peft_ref.generate(prompt_ids, old, 12)
    assert [e.token_id for e in after] == peft_ref.generate(prompt_ids, new, 12)
    assert [e.token_id for e in events] != [e.token_id for e in after]


async def test_lru_eviction_under_a_tiny_budget(
    store: Any, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    one = artifacts[10].nbytes  # the device tier holds one 10-long prefix; the host tier two
    cache = cache_for(store, tiny, device_bytes=one, host_bytes=2 * one)
    a = await cache.resolve("default", "task-10")
    b = await cache.resolve("default", "task-5")
    assert cache.cached_versions("device") == [("default", "task-5", 1)]
    assert cache.cached_versions("host") == [("default", "task-10", 1)]  # demoted, not dropped
    assert cache.stats.evictions["device"] == 1
    again = await cache.resolve("default", "task-10")  # host hit, promoted back; no store read
    assert store.get_calls == 2 and cache.stats.hits["host"] == 1
    assert torch.equal(again.artifact.prefixes["decoder"], a.artifact.prefixes["decoder"])
    await cache.resolve("default", "task-1")
    await cache.resolve("default", "task-200")  # bigger than both tiers: served, not kept
    assert ("default", "task-200", 1) not in cache.cached_versions("device") + cache.cached_versions("host")
    assert cache.stats.bytes["device"] <= one and cache.stats.bytes["host"] <= 2 * one
    assert b.version == 1


async def test_store_down_cached_tasks_serve_uncached_fail(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        warm = await collect(engine, GenerationRequest("warm", PROMPT, greedy(4), task="task-5"))
        store.fail_with = StoreUnavailable("redis: connection refused")
        cached = await collect(engine, GenerationRequest("cached", PROMPT, greedy(4), task="task-5"))
        assert [e.token_id for e in cached] == [e.token_id for e in warm]
        with pytest.raises(StoreUnavailable):
            await collect(engine, GenerationRequest("cold", PROMPT, greedy(4), task="task-10"))
        store.fail_with = None  # the store is back: the same task loads
        assert len(await collect(engine, GenerationRequest("cold2", PROMPT, greedy(2), task="task-10"))) == 2


async def test_invalid_blob_and_deleted_task(store: Any, tiny: LoadedModel) -> None:
    cache = cache_for(store, tiny)
    await store.inner.put("default", "broken", b"\x80\x04 this is a pickle, not safetensors", {})
    with pytest.raises(InvalidPrefix, match="broken v1 does not fit this model: .*pickle"):
        await cache.resolve("default", "broken")
    await cache.resolve("default", "task-1")
    await store.inner.delete("default", "task-1")  # change event: version None
    assert cache.cached_versions("device") == []
    with pytest.raises(UnknownTask):
        await cache.resolve("default", "task-1")


async def test_load_in_flight_when_the_task_is_deleted_does_not_resurrect_it(
    store: Any, tiny: LoadedModel
) -> None:
    cache = cache_for(store, tiny)
    read_done, release = asyncio.Event(), asyncio.Event()
    inner_get = store.inner.get

    async def slow_get(tenant: str, task: str, version: int | None = None) -> Any:
        stored = await inner_get(tenant, task, version)  # reads v1 ...
        read_done.set()
        await release.wait()  # ... and is slow to hand it back
        return stored

    store.inner.get = slow_get
    early = asyncio.ensure_future(cache.resolve("default", "task-1"))
    await read_done.wait()
    await store.inner.delete("default", "task-1")  # change event (version None) while the load runs
    store.inner.get = inner_get
    release.set()
    assert (await early).version == 1  # the request that was already waiting still gets its read
    assert cache.cached_versions("device") == []  # ... but the stale read is not cached
    with pytest.raises(UnknownTask):
        await cache.resolve("default", "task-1")


async def test_request_after_a_new_version_does_not_join_a_stale_load(
    store: Any, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    cache = cache_for(store, tiny)
    read_done, release = asyncio.Event(), asyncio.Event()
    inner_get = store.inner.get

    async def slow_get(tenant: str, task: str, version: int | None = None) -> Any:
        stored = await inner_get(tenant, task, version)
        if stored.info.version == 1:
            read_done.set()
            await release.wait()
        return stored

    store.inner.get = slow_get
    early = asyncio.ensure_future(cache.resolve("default", "task-5"))
    await read_done.wait()
    await store.inner.put("default", "task-5", dump_artifact(artifacts[10]), {})  # v2, notified
    # Arrives after the notification: must not wait for (and get) the stale load of v1.
    late = await asyncio.wait_for(cache.resolve("default", "task-5"), timeout=5)
    release.set()
    assert (await early).version == 1 and late.version == 2
    assert cache.cached_versions("device") == [("default", "task-5", 2)]


class _CopyInFlight:
    """Stands in for a side-stream copy's CUDA event: until `synchronize()`, the destination holds
    garbage (NaN), as device memory does before an asynchronous copy has landed."""

    def __init__(self, src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
        self.src, self.dst = src, dst
        self.done = False

    def synchronize(self) -> None:
        if not self.done:
            for kind, tensor in self.src.items():
                self.dst[kind].copy_(tensor)
            self.done = True


class _SlowCopyTransfer(PrefixTransfer):
    """`to_device` queues the copy and returns at once, with an event, like the CUDA path."""

    def to_device(self, artifact: PrefixArtifact) -> DevicePrefix:
        dst = {kind: torch.full_like(t, float("nan")) for kind, t in artifact.prefixes.items()}
        return DevicePrefix(PrefixArtifact(dst, artifact.metadata), _CopyInFlight(artifact.prefixes, dst))


async def test_demotion_never_reads_a_device_copy_still_in_flight(
    store: Any, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    # The device tier holds task-5 and task-1; task-10 evicts both in one insert, while all three
    # copies to the device are still in flight (no step has waited on their events).
    cache = cache_for(store, tiny, device_bytes=artifacts[10].nbytes)
    cache.transfer = _SlowCopyTransfer(tiny.device, tiny.dtype)
    for length in (5, 1, 10):
        await cache.resolve("default", f"task-{length}")
    assert cache.cached_versions("device") == [("default", "task-10", 1)]
    assert cache.cached_versions("host") == [("default", "task-5", 1), ("default", "task-1", 1)]
    for length in (5, 1):  # promoted back from the host tier: what was demoted is the stored prefix
        again = await cache.resolve("default", f"task-{length}")
        assert store.get_calls == 3  # host hits, no store reads
        again.ready.synchronize()  # what the step does (on the GPU) before it reads the prefix
        assert torch.equal(again.artifact.prefixes["decoder"], artifacts[length].prefixes["decoder"])


def test_back_to_host_waits_for_the_copy_to_the_device(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    transfer = _SlowCopyTransfer(tiny.device, tiny.dtype)
    in_flight = transfer.to_device(artifacts[10])
    host = transfer.back_to_host(in_flight)
    assert in_flight.ready.done
    assert torch.equal(host.prefixes["decoder"], artifacts[10].prefixes["decoder"])


async def test_churning_task_names_leaves_no_state_behind(
    store: Any, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    """Upload -> load -> delete of ever-new task names (a tenant's CI making a task per run) keeps
    nothing per name in the cache or the store: what the cache's and the store's code allocated and
    still hold after 200 more cycles stays within a few bytes per cycle (tracemalloc)."""
    cache = cache_for(store, tiny)
    data = dump_artifact(artifacts[5])

    async def churn(first: int, cycles: int) -> None:
        for i in range(first, first + cycles):
            await store.inner.put("default", f"churn-{i}", data, {})
            assert (await cache.resolve("default", f"churn-{i}")).version == 1
            await store.inner.delete("default", f"churn-{i}")

    await churn(0, 20)  # containers reach their working size
    ours = [
        tracemalloc.Filter(True, "*/prefix_store/*", all_frames=True),
        tracemalloc.Filter(True, "*/server/engine/prefix_cache.py", all_frames=True),
        # CPython's C JSON scanner keeps a few bytes per json.loads with hooks: not ours to fix.
        tracemalloc.Filter(False, "*/json/decoder.py"),
    ]
    tracemalloc.start(32)
    try:
        await churn(20, 200)
        gc.collect()
        held = sum(s.size for s in tracemalloc.take_snapshot().filter_traces(ours).statistics("filename"))
    finally:
        tracemalloc.stop()
    assert held < 200 * 32, f"{held / 200:.0f} bytes per cycle still held after churning task names"
    assert cache.cached_versions("device") == [] and cache.cached_versions("host") == []

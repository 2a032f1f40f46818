"""Device residency (what `vllm:lora_requests_info` reports to the endpoint picker) and warm start
(`Engine.warm`), on a real engine over a real LocalPrefixStore."""

from __future__ import annotations

from typing import Any

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine import GenerationRequest
from tests.engine.conftest import collect, greedy

PROMPT = "Once upon a time"


def one_prefix_bytes(tiny: LoadedModel, length: int) -> int:
    spec = tiny.spec
    return spec.num_layers * 2 * spec.num_heads * length * spec.head_dim * 4  # float32


async def test_residency_follows_the_device_tier_not_the_requests(
    make_engine: Any, store: Any, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    # The device tier holds one 10-long prefix (+ a 5-long one), max_prefix_length 10: capacity 1.
    device = artifacts[10].nbytes + artifacts[5].nbytes
    async with make_engine(store, device_prefix_cache_bytes=device, max_prefix_length=10) as engine:
        assert engine.resident_prefixes == []
        assert engine.resident_prefix_capacity == device // one_prefix_bytes(tiny, 10) == 1
        await collect(engine, GenerationRequest("a", PROMPT, greedy(2), task="task-10"))
        # Resident after the request ended: a router should still send this task here.
        assert engine.running_tasks == [] and engine.waiting_tasks == []
        assert engine.resident_prefixes == [("default", "task-10")]
        await collect(engine, GenerationRequest("b", PROMPT, greedy(2), task="task-5"))
        resident = engine.resident_prefixes
        assert resident == [("default", "task-10"), ("default", "task-5")]
        # Never below what is resident (shorter prefixes fit more than the floor).
        assert engine.resident_prefix_capacity == 2
        await collect(
            engine, GenerationRequest("c", PROMPT, greedy(2), task="task-1")
        )  # evicts task-10 (LRU)
        assert ("default", "task-10") not in engine.resident_prefixes


async def test_warm_loads_without_a_request_and_the_next_request_reads_nothing(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        assert await engine.warm("default", "task-5") is True
        assert store.get_calls == 1
        assert engine.resident_prefixes == [("default", "task-5")]  # room on the device: copied there
        stats = engine.prefix_cache_stats
        assert stats is not None and stats.store_reads == {"warm": 1}
        events = await collect(engine, GenerationRequest("r", PROMPT, greedy(3), task="task-5"))
        assert events[-1].prefix_version == 1
        assert store.get_calls == 1 and stats.store_reads == {"warm": 1}  # no read for the request
        # A warm load is not a use: only the request counts toward the store's warm-start ranking.
        assert engine.prefix_cache is not None
        assert engine.prefix_cache.take_uses() == {("default", "task-5"): 1}


async def test_warm_never_raises(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        assert await engine.warm("default", "no-such-task") is False
        assert await engine.warm("default", "../etc") is False  # invalid name
        store.fail_with = ConnectionError("store down")
        assert await engine.warm("default", "task-10") is False
    async with make_engine(None) as bare:  # no store at all
        assert await bare.warm("default", "task-10") is False


async def test_warming_never_pushes_out_a_more_used_task(
    make_engine: Any, store: Any, artifacts: dict[int, PrefixArtifact]
) -> None:
    # Host and device tiers hold one 10-long prefix each. Warmed most used first: task-10, then task-5.
    # task-5 does not fit beside task-10 on the host tier, and evicts itself rather than task-10.
    one = artifacts[10].nbytes
    async with make_engine(store, device_prefix_cache_bytes=0, host_prefix_cache_bytes=one) as engine:
        assert await engine.warm("default", "task-10") is True
        await engine.warm("default", "task-5")
        assert engine.prefix_cache is not None
        assert engine.prefix_cache.cached_versions("host") == [("default", "task-10", 1)]
        calls = store.get_calls
        await collect(engine, GenerationRequest("r", PROMPT, greedy(2), task="task-10"))
        assert store.get_calls == calls


async def test_uses_are_flushed_to_the_store_for_warm_starts(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        for i in range(3):
            await collect(engine, GenerationRequest(f"a{i}", PROMPT, greedy(1), task="task-5"))
        await collect(engine, GenerationRequest("b", PROMPT, greedy(1), task="task-10"))
        await collect(engine, GenerationRequest("bare", PROMPT, greedy(1)))  # no task: not counted
    # stop() flushes what was served since the last periodic flush.
    assert await store.inner.most_used(10) == [("default", "task-5"), ("default", "task-10")]

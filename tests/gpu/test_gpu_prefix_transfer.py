"""GPU checks of the prefix host tier and its side-stream copies (marker `gpu`, skipped
cleanly without CUDA): host-tier tensors are pinned, a copy to the device is queued on a side stream
with an event, the compute stream that waits on the event reads exactly the host values, and an
engine whose prefixes all come through the host tier generates what the CPU engine generates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from modeling.models import load_model, make_model_dir
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.prefix_transfer import PrefixTransfer, wait_until_ready
from server.limits import Limits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _artifact(spec: Any, length: int, seed: int, task: str) -> Any:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, spec.num_heads, length, spec.head_dim)
    return new_artifact({"decoder": torch.randn(shape, generator=g) * 0.5}, spec, task=task)


def test_host_tier_is_pinned_and_the_side_stream_copy_is_exact(tmp_path: Path) -> None:
    loaded = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "m")), "cpu", "float32")
    artifact = _artifact(loaded.spec, 200, 0, "t")
    transfer = PrefixTransfer(torch.device("cuda"), torch.float32)
    host = transfer.to_host(artifact)
    assert all(t.is_pinned() for t in host.prefixes.values())
    moved = transfer.to_device(host)
    assert moved.ready is not None  # a CUDA event the compute stream waits on
    wait_until_ready(moved)
    on_device = moved.artifact.prefixes["decoder"]
    doubled = on_device * 2  # queued on the compute stream, after the copy
    assert torch.equal(doubled.cpu(), artifact.prefixes["decoder"] * 2)


async def _generate(model_dir: Path, tmp: Path, device: str) -> list[list[int]]:
    loaded = load_model(str(model_dir), device=device, dtype="float32")
    store = LocalPrefixStore(tmp / f"store-{device}")
    await store.start()
    for i in range(6):
        await store.put("default", f"t{i}", dump_artifact(_artifact(loaded.spec, 50, i, f"t{i}")), {})
    one = 50 * loaded.spec.num_layers * 2 * loaded.spec.num_heads * loaded.spec.head_dim * 4
    # A device tier of two prefixes for six tasks: prefixes move host -> device -> host all the time.
    limits = Limits(max_batch_size=4, device_prefix_cache_bytes=2 * one, host_prefix_cache_bytes=8 * one)
    engine = Engine(loaded, store, EngineConfig(limits))
    await engine.start()
    try:

        async def one_request(i: int) -> list[int]:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            req = GenerationRequest(f"r{i}", list(range(100 + i, 120 + i)), params, task=f"t{i % 6}")
            return [e.token_id async for e in engine.generate(req)]  # type: ignore[misc]

        return list(await asyncio.gather(*(one_request(i) for i in range(18))))
    finally:
        await engine.stop(0)
        await store.close()


async def test_engine_through_the_host_tier_equals_the_cpu_engine(tmp_path: Path) -> None:
    model_dir = make_model_dir("tiny-gpt2", tmp_path / "m", initializer_range=0.3)
    assert await _generate(model_dir, tmp_path, "cuda") == await _generate(model_dir, tmp_path, "cpu")


async def test_tiers_on_cuda_demote_pinned_and_promote_back_exactly(tmp_path: Path) -> None:
    from server.engine.prefix_cache import PrefixCache

    loaded = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "m")), "cpu", "float32")
    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    originals = {f"t{i}": _artifact(loaded.spec, 20, i, f"t{i}") for i in range(2)}
    for task, artifact in originals.items():
        await store.put("default", task, dump_artifact(artifact), {})
    one = originals["t0"].nbytes
    limits = Limits(device_prefix_cache_bytes=one, host_prefix_cache_bytes=4 * one)
    cache = PrefixCache(store, loaded.spec, torch.device("cuda"), torch.float32, limits)
    cache.start()
    try:
        for task in ("t0", "t1", "t0"):  # t0 is demoted by t1, then promoted back from the host tier
            resolved = await cache.resolve("default", task)
            wait_until_ready(resolved.device_prefix)
            assert resolved.artifact.prefixes["decoder"].is_cuda
            assert torch.equal(
                resolved.artifact.prefixes["decoder"].cpu(), originals[task].prefixes["decoder"]
            )
        assert cache.cached_versions("device") == [("default", "t0", 1)]
        assert cache.cached_versions("host") == [("default", "t1", 1)]
        assert cache.stats.hits["host"] == 1
    finally:
        await store.close()


def test_back_to_host_waits_for_a_side_stream_copy_still_in_flight(tmp_path: Path) -> None:
    loaded = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "m")), "cpu", "float32")
    artifact = _artifact(loaded.spec, 200, 1, "t")
    transfer = PrefixTransfer(torch.device("cuda"), torch.float32)
    host = transfer.to_host(artifact)
    with torch.cuda.stream(transfer._stream):
        torch.cuda._sleep(200_000_000)  # holds the side stream (~0.1 s): the copy lands well after this
    in_flight = transfer.to_device(host)
    assert not in_flight.ready.query()  # the copy has not landed yet
    back = transfer.back_to_host(in_flight)
    assert torch.equal(back.prefixes["decoder"], artifact.prefixes["decoder"])


async def test_one_insert_demoting_two_prefixes_in_flight_keeps_both_exact(tmp_path: Path) -> None:
    from server.engine.prefix_cache import PrefixCache

    loaded = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "m")), "cpu", "float32")
    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    originals = {f"t{n}": _artifact(loaded.spec, n, n, f"t{n}") for n in (5, 1, 10)}
    for task, artifact in originals.items():
        await store.put("default", task, dump_artifact(artifact), {})
    limits = Limits(device_prefix_cache_bytes=originals["t10"].nbytes, host_prefix_cache_bytes=1 << 30)
    cache = PrefixCache(store, loaded.spec, torch.device("cuda"), torch.float32, limits)
    cache.start()
    try:
        for task in ("t5", "t1", "t10"):  # t10 evicts t5 and t1 at once, their copies maybe in flight
            with torch.cuda.stream(cache.transfer._stream):
                torch.cuda._sleep(50_000_000)
            await cache.resolve("default", task)
        assert cache.cached_versions("host") == [("default", "t5", 1), ("default", "t1", 1)]
        for task in ("t5", "t1"):
            resolved = await cache.resolve("default", task)
            wait_until_ready(resolved.device_prefix)
            assert torch.equal(
                resolved.artifact.prefixes["decoder"].cpu(), originals[task].prefixes["decoder"]
            )
    finally:
        await store.close()

"""GPU checks of engine v2's paths (marker `gpu`; skipped cleanly without CUDA).

On CUDA the step's inputs travel in one pinned, non-blocking copy and the paged pool is allocated up
front; these tests run the same scenarios as the CPU suite there: chunked prefill beside decoding rows
and shared prefixes (fp32: token-for-token equal to the CPU engine; bf16: close), seeded sampling
reproducible whatever the batch-mates, and a device prefix tier smaller than the working set.
CUDA graphs are not implemented yet (see the README's engine section), so there is no on = off test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from modeling.models import load_model
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.gpt2_runner import GPT2Runner
from server.engine.runner import PrefillItem
from server.limits import Limits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LONG = list(range(2000, 2300))  # a 300-token prompt: several chunks at max_prefill_tokens=64


async def _run(
    model_dir: Path, tmp: Path, device: str, dtype: str, params: Any, **limits: Any
) -> list[list[int]]:
    loaded = load_model(str(model_dir), device=device, dtype=dtype)
    store = LocalPrefixStore(tmp / f"store-{device}-{dtype}")
    await store.start()
    for i, length in enumerate((10, 200, 10)):
        g = torch.Generator().manual_seed(i)
        prefix = torch.randn(
            loaded.spec.num_layers, 2, loaded.spec.num_heads, length, loaded.spec.head_dim, generator=g
        )
        artifact = new_artifact({"decoder": prefix * 0.5}, loaded.spec, f"t{i}")
        await store.put("default", f"t{i}", dump_artifact(artifact), {})
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=8, max_prefill_tokens=64, **limits)))
    await engine.start()
    try:

        async def one(i: int, prompt: list[int], task: str | None) -> list[int]:
            await asyncio.sleep(0.02 * i)
            req = GenerationRequest(f"r{i}", prompt, params, task=task)
            return [e.token_id async for e in engine.generate(req)]  # type: ignore[misc]

        jobs = [(list(range(100, 130)), "t0"), (LONG, "t1"), (list(range(500, 540)), "t0"), (LONG[:70], None)]
        return list(await asyncio.gather(*(one(i, p, t) for i, (p, t) in enumerate(jobs))))
    finally:
        await engine.stop(0)
        await store.close()


async def test_chunked_prefill_and_shared_prefixes_fp32_equal_cpu(gpt2_dir: Path, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert await _run(gpt2_dir, tmp_path, "cuda", "float32", params) == await _run(
        gpt2_dir, tmp_path, "cpu", "float32", params
    )


async def test_bf16_starts_like_fp32(gpt2_dir: Path, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    bf16 = await _run(gpt2_dir, tmp_path, "cuda", "bfloat16", params)
    fp32 = await _run(gpt2_dir, tmp_path, "cuda", "float32", params)
    assert [out[:2] for out in bf16] == [out[:2] for out in fp32]  # rounding may flip later near-ties


async def test_seeded_sampling_is_reproducible_on_cuda(gpt2_dir: Path, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    first = await _run(gpt2_dir, tmp_path, "cuda", "float32", params)
    assert await _run(gpt2_dir, tmp_path, "cuda", "float32", params) == first


async def test_device_prefix_tier_smaller_than_the_working_set(gpt2_dir: Path, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    small = await _run(gpt2_dir, tmp_path, "cuda", "float32", params, device_prefix_cache_bytes=1)
    assert small == await _run(gpt2_dir, tmp_path, "cuda", "float32", params)


def test_step_inputs_are_one_pinned_copy_and_the_pool_lives_on_the_device(gpt2_dir: Path) -> None:
    loaded = load_model(str(gpt2_dir), device="cuda", dtype="float32")
    runner = GPT2Runner(loaded, max_rows=4, kv_budget_bytes=64 << 20)
    assert runner.cache.keys.is_cuda
    copies: list[bool] = []
    real_to = torch.Tensor.to

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.device.type == "cpu" and self.dtype == torch.long:
            copies.append(self.is_pinned())
        return real_to(self, *args, **kwargs)

    torch.Tensor.to = spy  # type: ignore[method-assign]
    try:
        runner.step({}, [PrefillItem("a", list(range(50)))])
    finally:
        torch.Tensor.to = real_to  # type: ignore[method-assign]
    assert copies == [True]

"""GPU checks of engine v2's paths (marker `gpu`; skipped cleanly without CUDA).

On CUDA the step's inputs travel in one pinned, non-blocking copy and the paged pool is allocated up
front; these tests run the same scenarios as the CPU suite there: chunked prefill beside decoding rows
and shared prefixes (fp32: token-for-token equal to the CPU engine; bf16: close), seeded sampling
reproducible whatever the batch-mates, and a device prefix tier smaller than the working set.
CUDA graphs (decode steps replayed per bucket, `server/engine/cuda_graphs.py`) and torch.compile: on
equals off (fp32: tokens equal, logits close; bf16: close), graphs replayed across bucket changes without
falling back to eager. These have never run on a GPU yet (no CUDA machine so far): the first run may
find what the CPU tests of the static path could not.
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
from server.engine.native_backend import NativeOptions
from server.engine.runner import PrefillItem
from server.limits import Limits
from tests.engine.conftest import random_artifact
from tests.engine.static_scenario import Logits, run_scenario

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LONG = list(range(2000, 2300))  # a 300-token prompt: several chunks at max_prefill_tokens=64


async def _run(
    model_dir: Path, tmp: Path, device: str, dtype: str, params: Any, cuda_graphs: bool = True, **limits: Any
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
    config = EngineConfig(Limits(max_batch_size=8, max_prefill_tokens=64, **limits))
    options = NativeOptions(cuda_graphs=cuda_graphs)
    engine = Engine(loaded, store, config, options=options)
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


# ---- CUDA graphs and torch.compile ----------------------------------------------------------------
def _scenario(model_dir: Path, dtype: str, **runner: Any) -> tuple[Logits, GPT2Runner]:
    """The static-path scenario of tests/engine (joins, finishes, prefixes 1/5/200, buckets 2/4/8)."""
    loaded = load_model(str(model_dir), device="cuda", dtype=dtype)
    artifacts = {n: random_artifact(loaded.spec, n, seed=100 + n) for n in (1, 5, 200)}
    for artifact in artifacts.values():  # the engine's prefix cache hands the runner device tensors
        artifact.prefixes["decoder"] = artifact.prefixes["decoder"].to("cuda", loaded.dtype)
    gpu_runner = GPT2Runner(loaded, max_rows=8, block_size=4, **runner)
    return run_scenario(gpu_runner, artifacts), gpu_runner


def _assert_close(got: Logits, want: Logits, tolerance: float, same_argmax: bool) -> None:
    """Every step's logits within `tolerance` x their scale (and, if asked, the same greedy token)."""
    assert got.keys() == want.keys()
    for rid in want:
        for step, (g, w) in enumerate(zip(got[rid], want[rid], strict=True)):
            scale = max(1.0, float(w.abs().max()))
            assert float((g - w).abs().max()) <= tolerance * scale, f"{rid} step {step}"
            if same_argmax:
                assert int(g.argmax()) == int(w.argmax()), f"{rid} step {step}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_on_equal_off(gpt2_dir: Path, dtype: str) -> None:
    on, runner = _scenario(gpt2_dir, dtype, cuda_graphs=True)
    off, plain = _scenario(gpt2_dir, dtype, cuda_graphs=False)
    assert plain.static_decoder is None
    assert runner.static_decoder is not None and runner.static_decoder.graphs_enabled  # no fallback
    if dtype == "float32":
        _assert_close(on, off, 1e-4, same_argmax=True)
    else:  # bf16: padded batches may pick other GEMM kernels, so rounding differs; close, not equal
        _assert_close(on, off, 3e-2, same_argmax=False)


def test_graphs_replay_across_bucket_changes(gpt2_dir: Path) -> None:
    _, runner = _scenario(gpt2_dir, "float32")
    decoder = runner.static_decoder
    assert decoder is not None and decoder.graphs_enabled
    assert {key.rows for key in decoder.stats.keys_seen} == {2, 4, 8}
    assert decoder.stats.graph_captures == len(decoder.stats.keys_seen) == len(decoder.graphs)
    assert decoder.stats.graph_replays == decoder.stats.static_steps - decoder.stats.graph_captures > 0


def test_torch_compile_on_equals_off(gpt2_dir: Path) -> None:
    compiled, runner = _scenario(gpt2_dir, "float32", torch_compile=True)  # compiled and graphed
    plain, _ = _scenario(gpt2_dir, "float32", cuda_graphs=False)
    assert runner.static_decoder is not None and runner.static_decoder.graphs_enabled
    _assert_close(compiled, plain, 1e-4, same_argmax=True)


async def test_engine_tokens_with_cuda_graphs_equal_without(gpt2_dir: Path, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert await _run(gpt2_dir, tmp_path, "cuda", "float32", params, cuda_graphs=True) == await _run(
        gpt2_dir, tmp_path, "cuda", "float32", params, cuda_graphs=False
    )

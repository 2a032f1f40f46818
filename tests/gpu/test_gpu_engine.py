"""GPU checks (marker `gpu`; `make test-gpu` on a CUDA machine, skipped cleanly elsewhere).

The engine runs the same code on CUDA as on CPU; these tests check it there against the plain HF model
with the prefix in its cache (positions from L) on the same device, in float32 (token-for-token) and in
bfloat16 (the production dtype: first-step logits close to float32).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from modeling.models import load_model
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.limits import Limits
from training.generation import greedy_causal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _prefix(spec, length: int, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_layers, 2, spec.num_heads, length, spec.head_dim, generator=g) * 0.5


async def _serve(loaded, store, requests):  # type: ignore[no-untyped-def]
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=8)))
    await engine.start()
    try:

        async def one(i: int, prompt: list[int], task: str | None, n: int) -> list[int]:
            await asyncio.sleep(0.01 * i)
            req = GenerationRequest(f"g{i}", prompt, SamplingParams(max_new_tokens=n), task=task)
            return [e.token_id async for e in engine.generate(req)]

        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    finally:
        await engine.stop(0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_mixed_task_batch_on_cuda_matches_hf(gpt2_dir: Path, tmp_path: Path, dtype: str) -> None:
    loaded = load_model(str(gpt2_dir), device="cuda", dtype=dtype)
    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    prefixes = {"a": _prefix(loaded.spec, 10, 1), "b": _prefix(loaded.spec, 200, 2)}
    for task, p in prefixes.items():
        await store.put("default", task, dump_artifact(new_artifact({"decoder": p}, loaded.spec, task)), {})
    prompts = [list(range(1000 + 7 * i, 1000 + 7 * i + 20 + 5 * i)) for i in range(4)]
    requests = [(prompts[0], "a", 12), (prompts[1], "b", 8), (prompts[2], None, 10), (prompts[3], "a", 6)]
    served = await _serve(loaded, store, requests)
    await store.close()
    eos = loaded.tokenizer.eos_token_id
    for (prompt, task, n), got in zip(requests, served, strict=True):
        prefix = None if task is None else prefixes[task].to("cuda", loaded.dtype)
        want = greedy_causal(loaded.model, prefix, [prompt], n, eos)[0]
        if dtype == "float32":
            assert got == want, task
        else:  # bf16 rounding may flip a near-tie late in the sequence; the start must agree
            assert got[:3] == want[:3], task

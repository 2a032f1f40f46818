"""Engine smoke benchmark: output tokens/s with and without prefixes, through the public engine API.

gpt2-shaped model (124M, random weights), 32 concurrent requests over 8 tasks, prompts of 32-128
tokens, 16-64 new tokens each (greedy, EOS ignored by construction: random weights rarely emit it).

    .venv/bin/python loadtest/engine_smoke.py [--preset gpt2] [--requests 32] [--tasks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import torch

from modeling.models import load_model, make_model_dir
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.limits import Limits


async def run(engine: Engine, requests: list[GenerationRequest]) -> tuple[int, float]:
    async def one(request: GenerationRequest) -> int:
        n = 0
        async for _ in engine.generate(request):
            n += 1
        return n

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    return sum(counts), time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(args.preset, Path(tmp) / "model")
        loaded = load_model(str(model_dir), "cpu", "float32")
        store = LocalPrefixStore(Path(tmp) / "store")
        await store.start()
        spec = loaded.spec
        for t in range(args.tasks):
            shape = (spec.num_layers, 2, spec.num_heads, args.prefix_length, spec.head_dim)
            artifact = new_artifact({"decoder": torch.randn(shape) * 0.5}, spec, task=f"task-{t}")
            await store.put("default", f"task-{t}", dump_artifact(artifact), {})

        def workload(with_prefix: bool) -> list[GenerationRequest]:
            r = random.Random(1)
            return [
                GenerationRequest(
                    f"{'p' if with_prefix else 'b'}{i}",
                    [r.randrange(1000, 40000) for _ in range(r.randint(32, 128))],
                    SamplingParams(max_new_tokens=r.randint(16, 64)),
                    task=f"task-{i % args.tasks}" if with_prefix else None,
                )
                for i in range(args.requests)
            ]

        engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=args.max_batch_size)))
        await engine.start()
        await run(engine, workload(True)[:2])  # warm-up (and prefix loads for two tasks)
        for name, with_prefix in (("prefixes", True), ("no prefix", False)):
            tokens, seconds = await run(engine, workload(with_prefix))
            print(f"{name:>10}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} output tok/s")
        await engine.stop()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())

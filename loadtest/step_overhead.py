"""Per-step time of the engine at batch 64 on a deep, narrow model (framework overhead made visible).

    python -m loadtest.step_overhead [--layers 24 --width 128 --batch 64 --steps 32]

A 24-layer GPT-2 of width 128 does little arithmetic per token, so a decode step's time is mostly the
per-layer, per-op cost of the framework (on CUDA: kernel launches). The script starts `--batch`
requests at once (16 tasks' prefixes of length 10, 8-token prompts), waits until all are decoding,
and reports the median time between the engine's steps over `--steps` steady decode steps. It uses
only the public engine API, so the same file measures another checkout (`PYTHONPATH=<checkout>`):
that is how "before" and "after" are compared in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modeling.models import load_model, make_model_dir
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, EngineObserver, GenerationRequest, SamplingParams
from server.limits import Limits


class _StepClock(EngineObserver):
    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.times.append((time.perf_counter(), batch_size))


async def measure(layers: int, width: int, batch: int, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir("gpt2", Path(tmp) / "model", n_layer=layers, n_embd=width, n_head=4)
        loaded = load_model(str(model_dir), "cpu", "float32")
        store = LocalPrefixStore(Path(tmp) / "store")
        await store.start()
        spec = loaded.spec
        for t in range(16):
            prefix = torch.randn(spec.num_layers, 2, spec.num_heads, 10, spec.head_dim) * 0.5
            await store.put("default", f"t{t}", dump_artifact(new_artifact({"decoder": prefix}, spec)), {})
        clock = _StepClock()
        engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=batch)), observer=clock)
        await engine.start()
        new_tokens = steps + 8
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        try:
            requests = [
                GenerationRequest(f"r{i}", list(range(100 + i, 108 + i)), params, task=f"t{i % 16}")
                for i in range(batch)
            ]
            await asyncio.gather(*(_drain(engine, r) for r in requests))
        finally:
            await engine.stop(0)
            await store.close()
    full = [t for t, n in clock.times if n == batch]  # steps where every row decoded
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)][:steps]
    return {"median_step_ms": 1000 * statistics.median(gaps), "steps": len(gaps), "batch": batch}


async def _drain(engine: Engine, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(asyncio.run(measure(args.layers, args.width, args.batch, args.steps)))


if __name__ == "__main__":
    main()

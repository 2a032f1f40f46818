"""CPU time of one GPT2Runner decode step, without the engine around it (attention and framework cost).

    python -m loadtest.runner_step [--layers 24 --width 128 --batch 64 --tasks 16 --prefix-len 10]

`--tasks 0` runs the same rows without prefixes (the no-prefix baseline of the same shape). The figure
is the median *thread CPU time* per step (`time.thread_time`), which other processes on a shared
machine disturb far less than wall time; compare two checkouts in one sitting with
`PYTHONPATH=<checkout>`. The long-prefix shape: `--layers 12 --width 768 --tasks 4 --prefix-len 200
--prompt-len 80`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modeling.models import load_model, make_model_dir
from prefix_store.artifact import new_artifact
from server.engine.gpt2_runner import GPT2Runner
from server.engine.runner import PrefillItem


def measure(
    layers: int, width: int, batch: int, tasks: int, prefix_len: int, prompt_len: int, steps: int
) -> dict[str, float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(
            "gpt2", Path(tmp) / "model", n_layer=layers, n_embd=width, n_head=max(4, width // 64)
        )
        loaded = load_model(str(model_dir), "cpu", "float32")
    spec = loaded.spec
    shape = (spec.num_layers, 2, spec.num_heads, prefix_len, spec.head_dim)
    artifacts = [new_artifact({"decoder": torch.randn(shape) * 0.5}, spec) for _ in range(tasks)]
    runner = GPT2Runner(loaded, max_rows=batch)
    items = [
        PrefillItem(
            f"r{i}",
            list(range(100 + i, 100 + prompt_len + i)),
            artifacts[i % tasks] if tasks else None,
            ("task", i % tasks) if tasks else None,
        )
        for i in range(batch)
    ]
    runner.step({}, items)
    tokens = dict.fromkeys(runner.request_ids, 5)
    times = []
    for i in range(steps + 3):
        start = time.thread_time()
        runner.step(tokens, [])
        if i >= 3:  # warm-up steps excluded
            times.append(time.thread_time() - start)
    return {"median_cpu_ms": 1000 * statistics.median(times), "min_cpu_ms": 1000 * min(times), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    print(
        measure(args.layers, args.width, args.batch, args.tasks, args.prefix_len, args.prompt_len, args.steps)
    )


if __name__ == "__main__":
    main()

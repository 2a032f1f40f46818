"""CPU time of one BartRunner decode step, without the engine around it (the BART twin of `runner_step`).

    python -m loadtest.bart_step [--batch 16 --tasks 4 --prefix-len 200 --source-len 512]

A `bart-base`-shaped model (6 + 6 layers, d_model 768, random weights); `--batch` rows over `--tasks`
tasks (round robin), each task with encoder, decoder and cross prefixes of `--prefix-len`, every row's
encoder input `--source-len` tokens (bos + source + eos). The figure is the median *thread CPU time* of
a decode step (`time.thread_time`, one intra-op thread); compare two checkouts in one sitting with
`PYTHONPATH=<checkout>` (it runs against the slot-cache runner of before issue 15 too).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modeling.model_spec import ModelSpec
from modeling.models import load_model, make_model_dir
from prefix_store.artifact import new_artifact
from server.engine.bart_runner import BartRunner
from server.engine.runner import PrefillItem

KINDS = ("encoder", "decoder", "cross")


def _prefix(spec: ModelSpec, kind: str, length: int) -> torch.Tensor:
    layers, heads, head_dim = spec.layout(kind)
    return torch.randn(layers, 2, heads, length, head_dim) * 0.5  # [layers, 2, H, L, D]


def measure(batch: int, tasks: int, prefix_len: int, source_len: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(make_model_dir("bart-base", Path(tmp) / "model")), "cpu", "float32")
    spec = loaded.spec
    artifacts = [new_artifact({k: _prefix(spec, k, prefix_len) for k in KINDS}, spec) for _ in range(tasks)]
    params = inspect.signature(BartRunner).parameters
    extra = (
        {"max_prefix_length": prefix_len} if "max_prefix_length" in params else {}
    )  # the slot-cache runner
    runner = BartRunner(loaded, max_rows=batch, **extra)
    items = [
        PrefillItem(
            f"r{i}",
            [(7 * i + j) % 50000 + 3 for j in range(source_len - 2)],  # + bos/eos = source_len
            artifacts[i % tasks] if tasks else None,
            ("task", i % tasks) if tasks else None,
        )
        for i in range(batch)
    ]
    runner.step({}, items)
    times = []
    for i in range(steps + 3):
        tokens = dict.fromkeys(runner.request_ids, 5 + i)
        start = time.thread_time()
        runner.step(tokens, [])
        if i >= 3:  # warm-up steps excluded
            times.append(time.thread_time() - start)
    return {"median_cpu_ms": 1000 * statistics.median(times), "min_cpu_ms": 1000 * min(times), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=200)
    parser.add_argument("--source-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(measure(args.batch, args.tasks, args.prefix_len, args.source_len, args.steps))


if __name__ == "__main__":
    main()

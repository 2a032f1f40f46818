"""CPU time of one GPT2Runner (or BartRunner) decode step, without the engine around it (attention and framework cost).

    python -m loadtest.runner_step [--layers 24 --width 128 --batch 64 --tasks 16 --prefix-len 10]

`--model bart` times a BartRunner decode step instead, on a `bart-base`-shaped model (6 + 6 layers,
d_model 768; `--layers/--width` do not apply): `--batch` rows over `--tasks` tasks (round robin), each
task with encoder, decoder and cross prefixes of `--prefix-len`, every row's encoder input
`--source-len` tokens (bos + source + eos); e.g. `--model bart --batch 16 --tasks 4 --prefix-len 200
--source-len 512`. It runs against the slot-cache BART runner of before the shared-prefix pools too.

`--tasks 0` runs the same rows without prefixes (the no-prefix baseline of the same shape). The figure
is the median *thread CPU time* per step (`time.thread_time`), which other processes on a shared
machine disturb far less than wall time; compare two checkouts in one sitting with
`PYTHONPATH=<checkout>`. The long-prefix shape: `--layers 12 --width 768 --tasks 4 --prefix-len 200
--prompt-len 80`.
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
    return _decode_cpu_ms(runner, items, steps)


def _decode_cpu_ms(runner: GPT2Runner | BartRunner, items: list[PrefillItem], steps: int) -> dict[str, float]:
    """Prefill `items`, then time `steps` decode steps of every row (after 3 warm-up steps)."""
    runner.step({}, items)
    tokens = dict.fromkeys(runner.request_ids, 5)
    times = []
    for i in range(steps + 3):
        start = time.thread_time()
        runner.step(tokens, [])
        if i >= 3:  # warm-up steps excluded
            times.append(time.thread_time() - start)
    return {"median_cpu_ms": 1000 * statistics.median(times), "min_cpu_ms": 1000 * min(times), "steps": steps}


KINDS = ("encoder", "decoder", "cross")


def _prefix(spec: ModelSpec, kind: str, length: int) -> torch.Tensor:
    layers, heads, head_dim = spec.layout(kind)
    return torch.randn(layers, 2, heads, length, head_dim) * 0.5  # [layers, 2, H, L, D]


def measure_bart(batch: int, tasks: int, prefix_len: int, source_len: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
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
    return _decode_cpu_ms(runner, items, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("gpt2", "bart"), default="gpt2")
    parser.add_argument("--source-len", type=int, default=512, help="bart: encoder input tokens per row")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.model == "bart":
        print(measure_bart(args.batch, args.tasks, args.prefix_len, args.source_len, args.steps))
        return
    print(
        measure(args.layers, args.width, args.batch, args.tasks, args.prefix_len, args.prompt_len, args.steps)
    )


if __name__ == "__main__":
    main()

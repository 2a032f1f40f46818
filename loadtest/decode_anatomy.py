"""Decode-step anatomy of the native engine: how its steps split into kinds, what each costs on the
device and on the host, and how often the static path replays a CUDA graph.

    python -m loadtest.decode_anatomy [--preset gpt2-medium --dtype bfloat16 --batch 64 --tasks 16 --out FILE]
                                      [--models-dir DIR]  (the model directory cache `prefixserve bench` uses)

Serves `--batch` requests at once (`--tasks` tasks' prefixes of length `--prefix-len`, prompts of
32-128 tokens, `--new-tokens` tokens each, EOS ignored) through an in-process `Engine`, and times
every `runner.step` call: on CUDA with a pair of CUDA events around it (the device time of the
step's kernels, queueing included) and on the host with `perf_counter` (launch and Python cost). A
step is `prefill` (only prompt chunks), `mixed` (decode rows and prompt chunks: always eager), or
`decode` (decode rows only), and a decode step is a `graph_replay`, a `static_eager` step (a bucket
without a graph: captured now, over the graph cap, or graphs off), or `eager` (no bucket fits). The
static decoder's counters (replays, captures, bucket keys met) come from its own stats. Writes one
JSON document (`--out`, default stdout). Runs on CPU too (no device times; what tests use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loadtest.bench_models import ensure_model
from modeling.models import load_model, resolve_device
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.limits import Limits


class StepTimer:
    """Wraps a runner's `step`: records each call's kind, host time and (CUDA) a pair of events."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.steps: list[dict[str, Any]] = []
        self._events: list[tuple[Any, Any]] = []
        self._inner = runner.step
        runner.step = self.step

    def _static_counts(self) -> tuple[int, int]:
        decoder = getattr(self.runner, "static_decoder", None)
        return (0, 0) if decoder is None else (decoder.stats.graph_replays, decoder.stats.static_steps)

    def step(self, decode_tokens: dict[str, int], items: list[Any]) -> Any:
        replays, statics = self._static_counts()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = self._inner(decode_tokens, items)
        host_s = time.perf_counter() - t0
        if self.cuda:
            end.record()
            self._events.append((start, end))
        after_replays, after_statics = self._static_counts()
        if items:
            kind = "mixed" if decode_tokens else "prefill"
        elif after_replays > replays:
            kind = "graph_replay"
        elif after_statics > statics:
            kind = "static_eager"
        else:
            kind = "eager"
        self.steps.append({"kind": kind, "rows": len(decode_tokens) + len(items), "host_s": host_s})
        return out

    def summary(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
            for step, (start, end) in zip(self.steps, self._events, strict=True):
                step["device_s"] = start.elapsed_time(end) / 1000
        kinds: dict[str, Any] = {}
        for kind in ("prefill", "mixed", "graph_replay", "static_eager", "eager"):
            steps = [s for s in self.steps if s["kind"] == kind]
            if not steps:
                continue
            entry = {
                "steps": len(steps),
                "mean_rows": statistics.fmean(s["rows"] for s in steps),
                "host_ms_p50": 1000 * statistics.median(s["host_s"] for s in steps),
                "host_ms_total": 1000 * sum(s["host_s"] for s in steps),
            }
            if self.cuda:
                entry["device_ms_p50"] = 1000 * statistics.median(s["device_s"] for s in steps)
                entry["device_ms_total"] = 1000 * sum(s["device_s"] for s in steps)
            kinds[kind] = entry
        decoder = getattr(self.runner, "static_decoder", None)
        graphs = None
        if decoder is not None:
            graphs = {
                "graphs_enabled": decoder.graphs_enabled,
                "graph_replays": decoder.stats.graph_replays,
                "graph_captures": decoder.stats.graph_captures,
                "static_steps": decoder.stats.static_steps,
                "graphs_held": len(decoder.graphs),
                "bucket_keys_seen": len(decoder.stats.keys_seen),
            }
        decode = [s for s in self.steps if s["kind"] in ("graph_replay", "static_eager", "eager")]
        replayed = sum(s["kind"] == "graph_replay" for s in decode)
        return {
            "steps": len(self.steps),
            "by_kind": kinds,
            "decode_steps_replayed_fraction": replayed / len(decode) if decode else None,
            "static_decoder": graphs,
        }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="prefixserve-anatomy-") as tmp:
        model_dir = ensure_model(args.preset, args.models_dir or Path(tmp) / "models")
        loaded = load_model(str(model_dir), str(device), args.dtype)
        spec = loaded.spec
        store = LocalPrefixStore(Path(tmp) / "store")
        await store.start()
        g = torch.Generator().manual_seed(0)
        for t in range(args.tasks):
            prefix = torch.randn(
                spec.num_layers, 2, spec.num_heads, args.prefix_len, spec.head_dim, generator=g
            )
            await store.put(
                "default", f"t{t}", dump_artifact(new_artifact({"decoder": prefix * 0.5}, spec)), {}
            )
        limits = Limits(max_batch_size=args.batch, max_waiting=4096, queue_timeout_s=3600.0)
        engine = Engine(loaded, store, EngineConfig(limits))
        started = time.perf_counter()
        await engine.start()  # captures the warm-up graphs on CUDA
        start_s = time.perf_counter() - started
        timer = StepTimer(engine.runner)
        rng = random.Random(0)
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        requests = [
            GenerationRequest(
                f"r{i}",
                [rng.randrange(1000, 50000) for _ in range(rng.randint(32, 128))],
                params,
                task=f"t{i % args.tasks}" if args.tasks else None,
            )
            for i in range(args.batch)
        ]
        try:
            wall0 = time.perf_counter()
            await asyncio.gather(*(_drain(engine, r) for r in requests))
            wall_s = time.perf_counter() - wall0
        finally:
            await engine.stop(0)
            await store.close()
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "models_dir")},
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "engine_start_s": start_s,
        "wall_s": wall_s,
        "output_tok_s": args.batch * args.new_tokens / wall_s,
        **timer.summary(),
    }


async def _drain(engine: Engine, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16, help="0: the bare model")
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="JSON file (default: stdout)")
    parser.add_argument("--models-dir", type=Path, help="model directory cache (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = json.dumps(asyncio.run(measure(args)), indent=2) + "\n"
    if args.out:
        args.out.write_text(doc)
    else:
        sys.stdout.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check script and its decode-step anatomy, run here on the CPU: every step writes its JSON
file into $OUT as it ends, a step that cannot run (no CUDA) says why, and the whole stays within its
time limit. On a CUDA machine the same script measures the GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loadtest import decode_anatomy

ROOT = Path(__file__).resolve().parents[2]


def test_decode_anatomy_splits_the_engines_steps_by_kind(tmp_path: Path) -> None:
    out = tmp_path / "anatomy.json"
    argv = ["--preset", "tiny-gpt2", "--device", "cpu", "--dtype", "float32", "--batch", "6", "--tasks", "3",
            "--new-tokens", "5", "--models-dir", str(tmp_path / "models"), "--out", str(out)]  # fmt: skip
    assert decode_anatomy.main(argv) == 0
    doc = json.loads(out.read_text())
    kinds = doc["by_kind"]
    assert sum(k["steps"] for k in kinds.values()) == doc["steps"] > 0
    assert set(kinds) <= {"prefill", "mixed", "graph_replay", "static_eager", "eager"}
    assert "prefill" in kinds or "mixed" in kinds  # prompts went in
    decode = sum(kinds.get(k, {}).get("steps", 0) for k in ("graph_replay", "static_eager", "eager"))
    assert decode >= 5 - 1  # every token after the first comes from a decode (or mixed) step
    assert doc["static_decoder"] is None and doc["decode_steps_replayed_fraction"] == 0.0  # no graphs on CPU
    assert all("device_ms_p50" not in k for k in kinds.values())  # CUDA events only on CUDA
    assert doc["output_tok_s"] > 0 and doc["config"]["batch"] == 6


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the script; on CUDA it runs for real")
def test_gpu_check_writes_one_json_per_step_within_its_time_limit(tmp_path: Path) -> None:
    """Here (no CUDA) the bench steps must end at once saying why; on a loaded machine a step may also
    hit its timeout, which its JSON then says, and the steps after it still run and write theirs."""
    out = tmp_path / "out"
    total_s = 240
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TOTAL_S": str(total_s),
           "GPU_CHECK_PRESET": "tiny-gpt2"}  # fmt: skip
    done = subprocess.run(
        ["bash", "loadtest/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=total_s + 120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = ["00-env", "01-decode-anatomy", "02-gpu-tests", "03-bench-c64", "04-bench-c256"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.json" for n in [*names, "05-summary"]]
    steps = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    for name, doc in steps.items():
        assert (
            set(doc) == {"step", "rc", "timed_out", "seconds", "log_tail", "result"} and doc["step"] == name
        )
        assert doc["timed_out"] == (doc["rc"] in (124, 137))
    assert steps["00-env"]["rc"] == 0 and steps["00-env"]["result"]["torch"] == torch.__version__
    anatomy = steps["01-decode-anatomy"]
    assert anatomy["timed_out"] or (anatomy["rc"] == 0 and anatomy["result"]["steps"] > 0)
    gpu_tests = steps["02-gpu-tests"]
    assert gpu_tests["timed_out"] or {t["outcome"] for t in gpu_tests["result"]["tests"]} == {"skipped"}
    for name in ("03-bench-c64", "04-bench-c256"):  # the bench says why it cannot run
        bench_step = steps[name]
        cannot = bench_step["rc"] == 2 and "needs CUDA" in bench_step["log_tail"]
        assert cannot or bench_step["timed_out"] or bench_step["rc"] == -1, bench_step
        assert bench_step["result"] is None
    summary = json.loads((out / "05-summary.json").read_text())
    assert [(s["step"], s["rc"]) for s in summary["steps"]] == [(n, steps[n]["rc"]) for n in names]
    assert summary["total_seconds"] <= total_s + 10

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
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "TOTAL_S": "150",
        "GPU_CHECK_PRESET": "tiny-gpt2",
    }
    done = subprocess.run(
        ["bash", "loadtest/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = ["00-env", "01-decode-anatomy", "02-gpu-tests", "03-bench-c64", "04-bench-c256"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.json" for n in [*names, "05-summary"]]
    steps = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    for name, doc in steps.items():
        assert (
            set(doc) == {"step", "rc", "timed_out", "seconds", "log_tail", "result"} and doc["step"] == name
        )
    assert steps["00-env"]["rc"] == 0 and steps["00-env"]["result"]["torch"] == torch.__version__
    anatomy = steps["01-decode-anatomy"]
    assert anatomy["rc"] == 0 and anatomy["result"]["steps"] > 0
    tests = steps["02-gpu-tests"]["result"]["tests"]
    assert tests and {t["outcome"] for t in tests} == {"skipped"}  # no CUDA here
    for name in ("03-bench-c64", "04-bench-c256"):  # the bench says why it cannot run, and the rest ran
        assert (
            steps[name]["rc"] == 2
            and "needs CUDA" in steps[name]["log_tail"]
            and steps[name]["result"] is None
        )
    summary = json.loads((out / "05-summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == names
    assert summary["total_seconds"] <= 150 + 10

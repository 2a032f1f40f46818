"""Data-parallel training through `torchrun`: two CPU processes (gloo) train what one process trains
with twice the gradient accumulation (same steps, losses and exported prefix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.conftest import FIXTURES

REPO = Path(__file__).resolve().parents[2]


def _argv(model: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(FIXTURES / "e2e" / "train.csv"), "--format", "e2e",
        "--task", "e2e", "--out", str(out), "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "5e-3",
        "--batch-size", "5", "--max-steps", "3", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def test_two_gloo_processes_train_like_one_with_double_accumulation(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ddp = subprocess.run(
        [*launcher, "-m", "prefixserve.cli", *_argv(tiny_gpt2_dir, tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "prefixserve.cli", *_argv(tiny_gpt2_dir, tmp_path / "one"), "--grad-accum", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and one_summary["world_size"] == 1
    assert ddp_summary["steps"] == one_summary["steps"] == 3
    ddp_losses = torch.tensor([loss for _, loss in ddp_summary["train_losses"]])
    one_losses = torch.tensor([loss for _, loss in one_summary["train_losses"]])
    torch.testing.assert_close(ddp_losses, one_losses, rtol=1e-4, atol=1e-5)
    ddp_prefix = load_file(tmp_path / "ddp" / "artifact.safetensors")
    one_prefix = load_file(tmp_path / "one" / "artifact.safetensors")
    assert ddp_prefix.keys() == one_prefix.keys()
    for name in ddp_prefix:
        torch.testing.assert_close(ddp_prefix[name], one_prefix[name], rtol=1e-4, atol=1e-5)

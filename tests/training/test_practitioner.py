"""What a practitioner needs from the loop: a per-step log, dev-BLEU model selection, fp16 loss scaling."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modeling.models import load_model
from tests.training.conftest import FIXTURES, SYNTHETIC
from training.cli import train_main
from training.data import Example, Truncation, encode_causal
from training.prefix import PrefixConfig, make_tuner
from training.trainer import TrainConfig, make_scaler, optimizer_step, train

EOS = 50256


def test_every_step_and_dev_evaluation_is_logged_as_jsonl(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    rows = encode_causal(loaded.tokenizer, [Example(s, t) for s, t in SYNTHETIC], EOS, EOS, Truncation())
    torch.manual_seed(0)
    tuner = make_tuner(loaded, PrefixConfig(prefix_length=4, mlp_hidden=32))
    cfg = TrainConfig(lr=1e-2, batch_size=3, max_steps=6, eval_every=3, warmup_steps=2, progress=False)
    train(tuner, rows, rows[:2], cfg, tmp_path, EOS)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0]["lr"] == 0.0 and steps[2]["lr"] > 0  # the warmup is visible
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in steps)
    assert [r["step"] for r in records if "dev_loss" in r] == [3, 6]


def test_dev_bleu_selection_exports_the_best_bleu_step(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "--model", str(tiny_gpt2_dir), "--data", str(FIXTURES / "e2e" / "train.csv"), "--format", "e2e",
        "--dev", str(FIXTURES / "e2e" / "test.csv"), "--task", "e2e", "--out", str(out),
        "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "5e-3", "--batch-size", "10",
        "--max-steps", "6", "--eval-every", "2", "--select-on", "bleu", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert train_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    bleus = summary["dev_bleus"]
    assert [s for s, _ in bleus] == [2, 4, 6]
    best_step, best = max(bleus, key=lambda sb: (sb[1], -sb[0]))  # first of the best
    assert summary["exported_step"] == best_step and summary["best_dev_bleu"] == best
    assert any("dev_bleu" in json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines())


def test_fp16_scaler_skips_a_step_with_inf_gradients_and_backs_off() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.5)
    scaler = make_scaler(torch.device("cpu"), "fp16", force=True)  # on CUDA, fp16 enables it
    assert not make_scaler(torch.device("cpu"), "fp16").is_enabled()  # CPU trains in fp32: no scaler
    scale = scaler.get_scale()
    scaler.scale(param.sum()).backward()
    param.grad[0] = float("inf")  # an fp16 overflow
    assert optimizer_step(scaler, opt, [param], 1.0) is False
    assert torch.equal(param.detach(), torch.ones(3)) and scaler.get_scale() == scale / 2
    opt.zero_grad()
    scaler.scale(param.sum()).backward()
    assert optimizer_step(scaler, opt, [param], 10.0) is True
    assert torch.allclose(param.detach(), torch.full((3,), 0.5))  # grad 1 unscaled, lr 0.5

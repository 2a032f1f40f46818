"""The loop: checkpoint/resume replays the same loss curve; early stopping stops and exports the best."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from modeling.models import load_model
from tests.training.conftest import SYNTHETIC
from training.data import Example, Truncation, encode_causal
from training.prefix import PrefixConfig, make_tuner
from training.trainer import TrainConfig, list_checkpoints, train

EOS = 50256


def _setup(model_dir: Path):  # type: ignore[no-untyped-def]
    loaded = load_model(str(model_dir), device="cpu")
    rows = encode_causal(loaded.tokenizer, [Example(s, t) for s, t in SYNTHETIC], EOS, EOS, Truncation())
    torch.manual_seed(0)
    return make_tuner(loaded, PrefixConfig(prefix_length=4, mlp_hidden=32)), rows


def test_resume_continues_the_same_loss_curve(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        lr=1e-2,
        batch_size=2,
        grad_accum=2,
        max_steps=8,
        checkpoint_every=4,
        keep_checkpoints=5,
        warmup_steps=2,
        progress=False,
    )
    tuner, rows = _setup(tiny_gpt2_dir)
    full = train(tuner, rows, None, cfg, tmp_path / "full", EOS)
    assert [s for s, _ in full.state.train_losses] == list(range(1, 9))
    ckpts = list_checkpoints(tmp_path / "full")
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000008"]
    # An interrupted run: a fresh process that only has the step-4 checkpoint.
    resumed_out = tmp_path / "resumed"
    shutil.copytree(ckpts[0], resumed_out / "checkpoints" / ckpts[0].name)
    tuner2, _ = _setup(tiny_gpt2_dir)
    resumed = train(tuner2, rows, None, cfg, resumed_out, EOS, resume=resumed_out)
    assert [s for s, _ in resumed.state.train_losses] == list(range(1, 9))
    for (s1, l1), (s2, l2) in zip(full.state.train_losses, resumed.state.train_losses, strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-6
    final_full, final_resumed = tuner.trainable_state(), tuner2.trainable_state()
    for name, value in final_full.items():
        assert torch.allclose(value, final_resumed[name], atol=1e-6), name


def test_early_stopping_stops_and_keeps_best_dev_state(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    tuner, rows = _setup(tiny_gpt2_dir)
    # Train on one half, evaluate on unrelated targets: with a huge lr the dev loss soon stops improving.
    cfg = TrainConfig(lr=0.3, batch_size=3, max_steps=60, eval_every=1, patience=2, progress=False)
    result = train(tuner, rows[:3], rows[3:], cfg, tmp_path / "es", EOS)
    assert result.stopped_early
    assert result.state.step < 60
    dev = result.state.dev_losses
    assert len(dev) >= 3 and result.state.evals_without_improvement == 2
    best_step, best = min(dev, key=lambda d: d[1])
    assert result.exported_step == best_step == result.state.best_step
    from training.trainer import evaluate_loss

    assert abs(evaluate_loss(tuner, rows[3:], 3, EOS) - best) < 1e-5  # the exported state is the best one


def test_resume_from_the_early_stop_checkpoint_trains_no_further(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    tuner, rows = _setup(tiny_gpt2_dir)
    cfg = TrainConfig(lr=0.3, batch_size=3, max_steps=60, eval_every=1, patience=2, progress=False)
    first = train(tuner, rows[:3], rows[3:], cfg, tmp_path / "es", EOS)
    assert first.stopped_early and first.state.step < 60
    assert list_checkpoints(tmp_path / "es")[-1].name == f"step-{first.state.step:08d}"
    tuner2, _ = _setup(tiny_gpt2_dir)
    resumed = train(tuner2, rows[:3], rows[3:], cfg, tmp_path / "es", EOS, resume=tmp_path / "es")
    assert resumed.stopped_early
    assert (resumed.state.step, resumed.exported_step) == (first.state.step, first.exported_step)
    assert resumed.state.train_losses == first.state.train_losses
    assert resumed.state.dev_losses == first.state.dev_losses
    exported, exported_again = tuner.trainable_state(), tuner2.trainable_state()
    for name, value in exported.items():  # both export the best dev state
        assert torch.allclose(value, exported_again[name]), name


def test_a_checkpoint_left_half_written_is_never_resumed_or_counted(tmp_path: Path) -> None:
    """A crash in `save_checkpoint` leaves `step-N.tmp`; it sorts after `step-N` and must not be taken
    as the latest checkpoint (it has no state.json) nor push a complete one out of `keep_checkpoints`."""
    from training.trainer import resolve_checkpoint

    root = tmp_path / "checkpoints"
    for name in ("step-00000010", "step-00000020"):
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text("{}")
    (root / "step-00000030.tmp").mkdir()
    (root / "step-00000030.tmp" / "trainable.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]
    assert resolve_checkpoint(tmp_path).name == "step-00000020"

"""BART: the paper's three prefixes (encoder, decoder, cross) learn a task through the functional
forward, and the exported artifact carries all three kinds and generates what the trainer generates."""

from __future__ import annotations

from pathlib import Path

import torch

from modeling.models import load_model
from prefix_store.artifact import load_artifact
from tests.training.conftest import SYNTHETIC
from training.data import Example, Truncation, encode_seq2seq, seq2seq_source
from training.export import export
from training.generation import generate_seq2seq
from training.prefix import PrefixConfig, make_tuner
from training.trainer import TrainConfig, evaluate_loss, train


def _run(model_dir: Path, out: Path, placement: str, steps: int):  # type: ignore[no-untyped-def]
    loaded = load_model(str(model_dir), device="cpu")
    c = loaded.model.config
    rows = encode_seq2seq(
        loaded.tokenizer,
        [Example(s, t) for s, t in SYNTHETIC],
        c.bos_token_id,
        c.eos_token_id,
        c.decoder_start_token_id,
        Truncation(),
    )
    torch.manual_seed(0)
    tuner = make_tuner(loaded, PrefixConfig(prefix_length=6, mlp_hidden=128, placement=placement))
    initial = evaluate_loss(tuner, rows, 8, c.pad_token_id)
    train(
        tuner,
        rows,
        None,
        TrainConfig(lr=1e-2, batch_size=6, max_steps=steps, warmup_steps=10, progress=False),
        out,
        c.pad_token_id,
    )
    return loaded, tuner, initial, evaluate_loss(tuner, rows, 8, c.pad_token_id)


def test_bart_three_prefixes_learn_and_export(tiny_bart_dir: Path, tmp_path: Path) -> None:
    loaded, tuner, initial, final = _run(tiny_bart_dir, tmp_path, "paper", 150)
    assert final < 0.3 * initial
    c = loaded.model.config
    sources = [
        seq2seq_source(loaded.tokenizer, s, c.bos_token_id, c.eos_token_id, Truncation())
        for s, _ in SYNTHETIC
    ]
    # What the prefix learned is shown by the loss (above); whether a barely trained prefix's greedy
    # answer is exactly the target is decided by the CPU's float rounding, so it is not asserted.
    expected = [tuner.greedy(src, 8) for src in sources]
    written = export(tuner, tmp_path, "colors", {"steps": 150})
    assert "peft" not in written
    artifact = load_artifact(Path(written["artifact"]).read_bytes(), loaded.spec)
    assert set(artifact.prefixes) == {"encoder", "decoder", "cross"}
    assert all(p.shape[3] == 6 for p in artifact.prefixes.values())
    assert generate_seq2seq(loaded.model, artifact.prefixes, sources, 8, c.eos_token_id) == expected


def test_bart_peft_placement_trains_decoder_prefix_only(tiny_bart_dir: Path, tmp_path: Path) -> None:
    loaded, tuner, initial, final = _run(tiny_bart_dir, tmp_path, "peft", 30)
    assert final < initial
    artifact = load_artifact(Path(export(tuner, tmp_path, "t", {})["artifact"]).read_bytes(), loaded.spec)
    assert set(artifact.prefixes) == {"decoder"}


def test_bart_init_from_text(tiny_bart_dir: Path) -> None:
    loaded = load_model(str(tiny_bart_dir), device="cpu")
    tuner = make_tuner(
        loaded, PrefixConfig(prefix_length=4, mlp_hidden=512, init_text="summarize:", init_steps=200)
    )
    assert set(tuner.init_report) == {"encoder", "decoder", "cross"}
    assert all(err < 0.05 for err in tuner.init_report.values()), tuner.init_report

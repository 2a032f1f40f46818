"""Prefix initialisation from real words: the paper's procedure and ours ("text-fit")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling.models import load_model
from tests.training.conftest import FIXTURES
from training.cli import eval_main, train_main
from training.prefix import PrefixConfig, make_tuner, mlp_output_to_prefix, text_token_ids

TEXT = "table-to-text:"


def _relative_error(tuner, target: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    spec = tuner.loaded.spec
    with torch.no_grad():
        flat = tuner.encoder(torch.arange(target.shape[3]))  # [L, layers*2*d]
        pred = mlp_output_to_prefix(flat, spec.num_layers, spec.num_heads)  # [layers, 2, H, L, D]
    return float((pred - target).norm() / target.norm())


def test_paper_init_fits_only_the_mlp_from_a_random_embedding(tiny_gpt2_dir: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    ids = text_token_ids(loaded.tokenizer, TEXT)
    cfg = PrefixConfig(prefix_length=len(ids), mlp_hidden=32, init_text=TEXT, init="paper")
    assert cfg.fit_settings() == (500, 1e-4, False)  # the paper's code: 500 steps, lr 1e-4, MLP only
    torch.manual_seed(3)
    random_tuner = make_tuner(loaded, PrefixConfig(prefix_length=len(ids), mlp_hidden=32))
    torch.manual_seed(3)
    tuner = make_tuner(loaded, cfg)
    # P' is the random init, untouched; the MLP moved towards the text's keys/values.
    assert torch.equal(tuner.encoder.embedding.weight, random_tuner.encoder.embedding.weight)
    target = tuner._text_keys_values(ids)  # [layers, 2, H, L, D]
    assert tuner.init_report["decoder"] == pytest.approx(_relative_error(tuner, target))
    assert _relative_error(tuner, target) < _relative_error(random_tuner, target)


def test_paper_init_refuses_a_length_other_than_the_texts_token_count(tiny_gpt2_dir: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    with pytest.raises(ValueError, match="token count|tokens"):
        make_tuner(loaded, PrefixConfig(prefix_length=3, mlp_hidden=16, init_text=TEXT, init="paper"))


def test_text_fit_starts_from_the_words_embeddings_and_fits_closely(tiny_gpt2_dir: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    torch.manual_seed(0)
    tuner = make_tuner(loaded, PrefixConfig(prefix_length=4, mlp_hidden=64, init_text=TEXT, init_steps=200))
    assert tuner.init_report["decoder"] < 0.5


def test_cli_paper_init_sets_length_and_prepends_the_text_in_train_and_eval(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = [
        "--model", str(tiny_gpt2_dir), "--data", str(FIXTURES / "e2e" / "train.csv"), "--format", "e2e",
        "--task", "e2e", "--out", str(out), "--mlp-hidden", "16", "--max-steps", "2", "--batch-size", "10",
        "--init", "paper", "--init-text", TEXT, "--init-steps", "5", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert train_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    assert summary["prefix"]["prefix_length"] == len(text_token_ids(loaded.tokenizer, TEXT))
    assert summary["prefix"]["init"] == "paper" and summary["prefix"]["source_prepend"] == TEXT
    results = tmp_path / "eval.json"
    rc = eval_main(
        [
            "--model", str(tiny_gpt2_dir), "--artifact", str(out / "artifact.safetensors"),
            "--data", str(FIXTURES / "e2e" / "test.csv"), "--format", "e2e", "--out", str(results),
            "--num-beams", "1", "--max-new-tokens", "3", "--limit", "2", "--device", "cpu",
        ]
    )  # fmt: skip
    assert rc == 0
    assert all(o["source"].startswith(TEXT + " name : ") for o in json.loads(results.read_text())["outputs"])
    with pytest.raises(SystemExit):
        train_main([*argv, "--prefix-length", "3"])

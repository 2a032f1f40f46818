"""E2E end to end through the CLI: train on the shipped slice, export, evaluate BLEU/ROUGE as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.models import load_model
from prefix_store.artifact import load_artifact
from tests.training.conftest import FIXTURES
from training.cli import eval_main, train_main, upload_main


def test_train_then_eval_on_e2e_slice(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = train_main(
        [
            "--model",
            str(tiny_gpt2_dir),
            "--data",
            str(FIXTURES / "e2e" / "train.csv"),
            "--format",
            "e2e",
            "--dev",
            str(FIXTURES / "e2e" / "test.csv"),
            "--task",
            "e2e",
            "--out",
            str(out),
            "--prefix-length",
            "5",
            "--mlp-hidden",
            "64",
            "--lr",
            "5e-3",
            "--batch-size",
            "10",
            "--max-steps",
            "24",
            "--init-text",
            "table-to-text:",
            "--init-steps",
            "50",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and len(summary["train_losses"]) == 24
    assert summary["dev_losses"] and summary["best_dev_loss"] < summary["initial_dev_loss"]
    assert summary["tokens_per_second"] > 0 and summary["loop"]["lr"] == 5e-3
    assert summary["prefix"]["prefix_length"] == 5 and summary["init_fit_relative_error"]["decoder"] >= 0
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    artifact = load_artifact((out / "artifact.safetensors").read_bytes(), loaded.spec)
    assert artifact.metadata.task == "e2e"
    assert (
        artifact.metadata.training["steps"] == 24 and artifact.metadata.training["dataset"]["format"] == "e2e"
    )
    assert (out / "peft" / "adapter_config.json").is_file() and (
        out / "peft" / "adapter_model.safetensors"
    ).is_file()
    assert (out / "checkpoints").is_dir()

    results = tmp_path / "results.json"
    rc = eval_main(
        [
            "--model",
            str(tiny_gpt2_dir),
            "--artifact",
            str(out / "artifact.safetensors"),
            "--data",
            str(FIXTURES / "e2e" / "test.csv"),
            "--format",
            "e2e",
            "--out",
            str(results),
            "--max-new-tokens",
            "12",
            "--limit",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    res = json.loads(results.read_text())
    assert 0.0 <= res["metrics"]["bleu"] <= 100.0
    assert all(0.0 <= res["metrics"][k] <= 100.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert res["num_sources"] == 4 and len(res["outputs"]) == 4
    # The paper's table-to-text decoding is the default for e2e: beam 5, newline tokens banned.
    assert res["config"]["num_beams"] == 5 and res["config"]["ban_newlines"] is True
    assert not any("\n" in o["generated"] for o in res["outputs"])
    assert all(len(o["references"]) >= 1 and isinstance(o["generated"], str) for o in res["outputs"])


def test_resume_neither_refits_init_text_nor_remeasures_initial_dev_loss(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.trainer
    from training.prefix import GPT2PrefixTuner

    def run(out: Path, max_steps: int, *extra: str) -> dict:  # type: ignore[type-arg]
        argv = [
            "--model", str(tiny_gpt2_dir), "--data", str(FIXTURES / "e2e" / "train.csv"),
            "--format", "e2e", "--dev", str(FIXTURES / "e2e" / "test.csv"), "--task", "e2e",
            "--out", str(out), "--prefix-length", "5", "--mlp-hidden", "32", "--batch-size", "10",
            "--max-steps", str(max_steps), "--init-text", "table-to-text:", "--init-steps", "5",
            "--device", "cpu", "--no-progress", *extra,
        ]  # fmt: skip
        assert train_main(argv) == 0
        return json.loads((out / "summary.json").read_text())

    first = run(tmp_path / "first", 2)
    assert first["initial_dev_loss"] is not None and first["init_fit_relative_error"]

    def no_fit(self: object, text: str) -> None:
        raise AssertionError("--init-text was fitted again on resume")

    in_train = False
    real_train, real_eval = training.trainer.train, training.trainer.evaluate_loss

    def train_spy(*args: object, **kwargs: object) -> object:
        nonlocal in_train
        in_train = True
        try:
            return real_train(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            in_train = False

    def eval_spy(*args: object, **kwargs: object) -> float:
        assert in_train, "a dev loss was measured on fresh weights before resuming"
        return real_eval(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GPT2PrefixTuner, "init_from_text", no_fit)
    monkeypatch.setattr(training.trainer, "train", train_spy)
    monkeypatch.setattr(training.trainer, "evaluate_loss", eval_spy)
    resumed = run(tmp_path / "resumed", 4, "--resume", str(tmp_path / "first"))
    assert resumed["steps"] == 4 and resumed["train_losses"][:2] == first["train_losses"]
    assert resumed["initial_dev_loss"] == first["initial_dev_loss"]
    assert resumed["init_fit_relative_error"] == first["init_fit_relative_error"]
    assert resumed["prefix"]["init_text"] == "table-to-text:"


def test_scores_are_right_on_known_text() -> None:
    from training.evaluate import score

    perfect = score(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)
    poor = score(["zebra"], [["the cat sat on the mat"]])
    assert poor["bleu"] < 5 and poor["rouge1"] == 0.0


def test_help_and_upload_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for main in (train_main, eval_main, upload_main):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
    assert "--prefix-length" in capsys.readouterr().out
    art = tmp_path / "a.safetensors"
    art.write_bytes(b"x")
    # Nothing listens on port 9 (discard): a clear error and exit code 1, no traceback.
    assert (
        upload_main(
            ["--server", "http://127.0.0.1:9", "--task", "t", "--artifact", str(art), "--timeout", "2"]
        )
        == 1
    )
    assert "could not reach" in capsys.readouterr().err

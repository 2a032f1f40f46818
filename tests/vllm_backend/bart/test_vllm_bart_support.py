"""Which BART models our vLLM BART serves, and the reason (a log line's) for those it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.models import LoadedModel, load_model, make_model_dir
from server.vllm_backend.support import bart_unsupported_reason


def tiny_bart(tmp_path: Path, **overrides: object) -> LoadedModel:
    return load_model(str(make_model_dir("tiny-bart", tmp_path / "model", **overrides)), "cpu", "float32")


def test_the_test_bart_is_served(bart: LoadedModel) -> None:
    assert bart_unsupported_reason(bart) is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, "decoder has 16"),  # tiny-bart: 64 wide, 4 heads
        ({"d_model": 96, "encoder_attention_heads": 2, "decoder_attention_heads": 2}, "decoder has 48"),
        (
            {"decoder_attention_heads": 2, "encoder_attention_heads": 2, "tie_word_embeddings": False},
            "ties the LM head",
        ),
    ],
)
def test_what_vllm_cannot_run_is_named(tmp_path: Path, overrides: dict[str, object], reason: str) -> None:
    assert reason in (bart_unsupported_reason(tiny_bart(tmp_path, **overrides)) or "")

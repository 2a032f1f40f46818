"""Fine-tuning fixtures: a tiny GPT-2 with peaked logits, training files, and helpers to follow a job.

These tests live outside tests/api and tests/reliability on purpose: those run a second time on the
vLLM backend, and nothing here depends on the engine (the tiny model runs on the native one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modeling.models import make_model_dir
from tests.api.conftest import (  # noqa: F401  (fixtures and keys re-exported for this package)
    ACME,
    ACME_GEN,
    GLOBEX,
    KEYS,
    api_model_dir,
    loaded,
    make_api,
    vllm_core,
)
from tests.training.conftest import SYNTHETIC

# Prompt/completion rows of the training tests' toy task; a served prompt is `prompt + "<|endoftext|>"`
# (the recipe's separator after a plain-form source).
COLORS = SYNTHETIC
EOS_TEXT = "<|endoftext|>"
TERMINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def colors_file() -> bytes:
    return jsonl([{"prompt": p, "completion": c} for p, c in COLORS])


def hyper(**values: Any) -> dict[str, Any]:
    """A job's `method` with these hyperparameters (tiny defaults: a small prefix and MLP)."""
    base = {"prefix_length": 4, "mlp_hidden": 32, "batch_size": 2, "n_epochs": 1}
    return {"type": "supervised", "supervised": {"hyperparameters": {**base, **values}}}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until `predicate()` returns something truthy; return it (fail after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def peaked_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with a large init (as tests/training's): next-token logits far apart, so greedy
    choices are decided by clear margins, not by float rounding."""
    return make_model_dir("tiny-gpt2", tmp_path_factory.mktemp("ft-gpt2"), seed=0, initializer_range=0.5)

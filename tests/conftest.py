"""Shared fixtures: random-weight models built once per test session from presets (no hub access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.models import make_model_dir
from tests import warnings_policy


def pytest_configure(config: pytest.Config) -> None:
    warnings_policy.install()  # FutureWarnings caused by our code fail the test (tests/warnings_policy.py)


def pytest_unconfigure(config: pytest.Config) -> None:
    warnings_policy.uninstall()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-gpt2", tmp_path_factory.mktemp("tiny-gpt2"), seed=0)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-bart", tmp_path_factory.mktemp("tiny-bart"), seed=0)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exactly GPT-2 small's shapes (124M parameters), random weights."""
    return make_model_dir("gpt2", tmp_path_factory.mktemp("gpt2"), seed=0)

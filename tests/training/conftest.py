"""Shared fixtures: tiny random-weight models built in-process, and a synthetic task.

The tiny models use larger init scales (GPT-2 `initializer_range=0.5`, BART `init_std=0.2`): with GPT-2's default 0.02 a 64-wide random model's logits
are nearly flat (std ~0.16), so no prefix could make any continuation likely and "the prefix learned
the task" would be untestable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from modeling.models import make_model_dir
from training.data import Example


def hf_prefix_cache(prefix: torch.Tensor, batch: int) -> DynamicCache:
    """HF's own cache holding `prefix` `[layers, 2, H, L, D]` for each of `batch` rows: how a plain HF
    model (the reference in these tests) is given a prefix; our code runs `modeling.gpt2` instead."""
    cache = DynamicCache()
    for i in range(prefix.shape[0]):
        keys = prefix[i, 0].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()  # [B, H, L, D]
        values = prefix[i, 1].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()  # [B, H, L, D]
        cache.update(keys, values, i)
    return cache


SYNTHETIC = [
    ("red", "apple pie"),
    ("blue", "ocean wave"),
    ("green", "forest tree"),
    ("yellow", "sun light"),
    ("black", "night sky"),
    ("white", "snow ball"),
]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models spend their time in thread hand-offs, not arithmetic: one thread is ~10x faster on a
    # loaded 2-core machine. Restored afterwards so other suites keep their setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-gpt2", tmp_path_factory.mktemp("tiny-gpt2"), seed=0, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-bart", tmp_path_factory.mktemp("tiny-bart"), seed=0, init_std=0.2)


@pytest.fixture
def synthetic() -> list[Example]:
    return [Example(s, t) for s, t in SYNTHETIC]

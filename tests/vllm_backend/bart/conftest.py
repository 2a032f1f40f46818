"""BART on vLLM fixtures: one vLLM core serving our prefix BART per test session (as for GPT-2).

The model is a small random BART vLLM's CPU attention can run (head_dim 32), with more encoder layers
than decoder layers so that a kind written to the wrong table, or read at the wrong depth, shows; and
init_std 0.2 so that greedy output depends on the source and on every prefix kind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from modeling.models import LoadedModel, load_model, make_model_dir
from server.limits import Limits
from server.vllm_backend.core import VllmCore, VllmOptions, prefix_row_bytes
from tests.vllm_backend.bart.driver import BartVllm, Prefixes

BART_OVERRIDES = {
    "d_model": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_layers": 3,
    "decoder_layers": 2,
    "init_std": 0.2,
}
MAX_PREFIX_LENGTH = 64
TABLE_ROWS = 1024  # rows of the test table (a row of this model: 14 vectors of 64 floats)
# (encoder, decoder, cross) prefix lengths of the test tasks; 0 = the task lacks that kind.
TASK_LENGTHS = {
    "a": (5, 3, 4),
    "b": (10, 10, 10),
    "c": (1, 7, 2),
    "encoder-only": (6, 0, 0),
    "decoder-only": (0, 4, 0),
    "cross-only": (0, 0, 6),
}


def random_prefixes(
    loaded: LoadedModel, lengths: tuple[int, int, int], seed: int, scale: float = 2.0
) -> Prefixes:
    """A prefix of each kind with a nonzero length: randn * `scale`, large enough to steer the model."""
    spec, generator = loaded.spec, torch.Generator().manual_seed(seed)
    prefixes = {}
    for kind, length in zip(("encoder", "decoder", "cross"), lengths, strict=True):
        if length:
            layers, heads, head_dim = spec.layout(kind)
            prefixes[kind] = torch.randn(layers, 2, heads, length, head_dim, generator=generator) * scale
    return prefixes


@pytest.fixture(scope="session")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-bart", tmp_path_factory.mktemp("bart-h32"), **BART_OVERRIDES)


@pytest.fixture(scope="session")
def bart(bart_dir: Path) -> LoadedModel:
    return load_model(str(bart_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def bart_tasks(bart: LoadedModel) -> dict[str, Prefixes | None]:
    tasks: dict[str, Prefixes | None] = {
        name: random_prefixes(bart, lengths, seed=200 + i)
        for i, (name, lengths) in enumerate(TASK_LENGTHS.items())
    }
    tasks["bare"] = None
    return tasks


def bart_limits(loaded: LoadedModel) -> Limits:
    return Limits(
        max_batch_size=8,
        max_prefix_length=MAX_PREFIX_LENGTH,
        vllm_prefix_table_bytes=TABLE_ROWS * prefix_row_bytes(loaded),
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def bart_vllm(bart: LoadedModel, bart_dir: Path) -> AsyncIterator[BartVllm]:
    """The core a server would start for this model (default options), on the session's loop."""
    core = VllmCore.start(bart, bart_limits(bart), VllmOptions(model_dir=str(bart_dir)))
    assert core.prefix_rows == TABLE_ROWS
    yield BartVllm(core, bart)
    core.shutdown()

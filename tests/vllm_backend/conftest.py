"""vLLM backend fixtures: one real vLLM engine (engine core process, compiled model) per test session.

Starting vLLM costs 30-90 s on the shared CI machine, so the tests of this package share one engine
and one event loop (`loop_scope="session"`). vLLM's CPU KV space is kept small and its threads few.
The model is the tiny GPT-2 with head_dim 32 (vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("vllm", reason="the vLLM backend is not installed (make VLLM_SPEC= install)")

from modeling.models import LoadedModel, load_model, make_model_dir  # noqa: E402
from prefix_store.artifact import PrefixArtifact, dump_artifact  # noqa: E402
from prefix_store.local_store import LocalPrefixStore  # noqa: E402
from server.engine import EngineConfig  # noqa: E402
from server.limits import Limits  # noqa: E402
from server.vllm_backend.engine import VllmEngine, VllmOptions  # noqa: E402
from tests.engine.conftest import TINY_OVERRIDES, PeftReference, random_artifact  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "2")

PREFIX_LENGTHS = (1, 5, 10, 200)
# Prefix table rows for the tests: room for every task above once, so a later task evicts
# (a row of the tiny model: 2 layers x (k, v) x 64 floats = 1 KiB).
TABLE_ROWS = 400
MAX_PREFIX_LENGTH = 256


@pytest.fixture(scope="session")
def h32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-gpt2-h32", tmp_path_factory.mktemp("tiny-gpt2-h32"), **TINY_OVERRIDES)


@pytest.fixture(scope="session")
def h32(h32_dir: Path) -> LoadedModel:
    return load_model(str(h32_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def h32_artifacts(h32: LoadedModel) -> dict[int, PrefixArtifact]:
    return {n: random_artifact(h32.spec, n, seed=100 + n, task=f"task-{n}") for n in PREFIX_LENGTHS}


@pytest.fixture(scope="session")
def h32_peft(h32_dir: Path, h32: LoadedModel) -> PeftReference:
    return PeftReference(h32_dir, h32)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_store(
    tmp_path_factory: pytest.TempPathFactory, h32_artifacts: dict[int, PrefixArtifact]
) -> AsyncIterator[LocalPrefixStore]:
    store = LocalPrefixStore(tmp_path_factory.mktemp("vllm-store"))
    await store.start()
    for n, artifact in h32_artifacts.items():
        await store.put("default", f"task-{n}", dump_artifact(artifact), {})
    yield store
    await store.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(h32: LoadedModel, h32_dir: Path, vllm_store: LocalPrefixStore) -> AsyncIterator[VllmEngine]:
    row_bytes = 2 * h32.spec.num_layers * h32.spec.hidden_size * 4
    limits = Limits(
        max_batch_size=8,
        max_prefix_length=MAX_PREFIX_LENGTH,
        vllm_prefix_table_bytes=TABLE_ROWS * row_bytes,
        queue_timeout_s=120,
    )
    engine = VllmEngine(h32, vllm_store, EngineConfig(limits), options=VllmOptions(model_dir=str(h32_dir)))
    await engine.start()
    yield engine
    await engine.stop(drain_timeout_s=0)

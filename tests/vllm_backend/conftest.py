"""vLLM backend fixtures: one real vLLM engine (engine core process, compiled model) per test session.

Starting vLLM costs 30-90 s on the shared CI machine, so the tests of this package share one engine
and one event loop (`loop_scope="session"`). vLLM's CPU KV space is kept small and its threads few.
The model is the tiny GPT-2 with head_dim 32 (vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("vllm", reason="the vLLM backend is not installed (make VLLM_SPEC= install)")

from modeling.models import LoadedModel, load_model, make_model_dir  # noqa: E402
from prefix_store.artifact import PrefixArtifact, dump_artifact  # noqa: E402
from prefix_store.local_store import LocalPrefixStore  # noqa: E402
from server.api import metrics_for  # noqa: E402
from server.main import build_engine  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.vllm_backend.engine import VllmEngine  # noqa: E402
from tests.api.conftest import KEYS  # noqa: E402
from tests.engine.conftest import TINY_OVERRIDES, PeftReference, random_artifact  # noqa: E402

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


@pytest.fixture(scope="session")
def vllm_settings(h32: LoadedModel, h32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The settings of the vLLM-backed app (`test_vllm_api.py`); its limits are the engine's."""
    row_bytes = 2 * h32.spec.num_layers * h32.spec.hidden_size * 4
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        model=str(h32_dir),
        served_model_name="tiny-gpt2-h32",
        engine="vllm",
        local_store_dir=tmp_path_factory.mktemp("unused-store"),
        api_keys=json.dumps(KEYS),
        log_format="text",
        max_batch_size=8,
        max_prefix_length=MAX_PREFIX_LENGTH,
        vllm_prefix_table_bytes=TABLE_ROWS * row_bytes,
        queue_timeout_s=120,
    )


@pytest.fixture(scope="session")
def vllm_metrics(vllm_settings: Settings) -> Metrics:
    return metrics_for(vllm_settings)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(
    h32: LoadedModel, vllm_store: LocalPrefixStore, vllm_settings: Settings, vllm_metrics: Metrics
) -> AsyncIterator[VllmEngine]:
    """Built as `server.main` builds it (`build_engine`), observed by the app's metrics."""
    engine = build_engine(vllm_settings, h32, vllm_store, vllm_metrics)
    assert isinstance(engine, VllmEngine)
    await engine.start()
    yield engine
    await engine.stop(drain_timeout_s=0)

"""The vLLM backend on CUDA (marker `gpu`; `make test-gpu` on a CUDA machine with vLLM's CUDA build,
skipped cleanly elsewhere): the same checks as tests/vllm_backend on the CPU, here with vLLM compiling
the model and replaying CUDA graphs, as a default start on a GPU does.

- fp32: greedy tokens equal HF PEFT's for each request alone (logprobs within 1e-3), for mixed tasks
  (prefix lengths 1 to 200) and bare rows in one batch;
- bf16: each chosen token within 0.3 of PEFT's (fp32) best logit, and the wrong reference (no prefix)
  off by more, so the check can fail;
- row churn under graphs: prefixes rewritten in rows a captured graph reads never serve the old bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import PrefixArtifact, dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import EngineConfig, GenerationRequest, SamplingParams, StreamEvent
from server.limits import Limits
from tests.engine.conftest import TINY_OVERRIDES, PeftReference, random_artifact

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.asyncio(loop_scope="module"),
]
vllm = pytest.importorskip("vllm", reason="vLLM's CUDA build is not installed (make VLLM=cuda install)")

LENGTHS = (1, 10, 200)
TABLE_ROWS = 600
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "Summarize:", "x"]


def _engine(loaded: LoadedModel, store: LocalPrefixStore, model_dir: Path) -> object:
    from server.vllm_backend.core import VllmOptions
    from server.vllm_backend.engine import VllmEngine

    row_bytes = 2 * loaded.spec.num_layers * loaded.spec.hidden_size * loaded.dtype.itemsize
    limits = Limits(
        max_batch_size=8,
        max_prefix_length=256,
        vllm_prefix_table_bytes=TABLE_ROWS * row_bytes,
        vllm_kv_cache_bytes=256 << 20,  # two engines (fp32, bf16) share the GPU with the reference
    )
    # Compiled, with CUDA graphs: vLLM's defaults on CUDA (no enforce_eager).
    return VllmEngine(loaded, store, EngineConfig(limits), options=VllmOptions(model_dir=str(model_dir)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-gpt2-h32", tmp_path_factory.mktemp("gpu-h32"), **TINY_OVERRIDES)


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), "cuda", "float32")


@pytest.fixture(scope="module")
def peft(model_dir: Path) -> PeftReference:
    """HF PEFT on the CPU in fp32: the reference (its own model copy, off the GPU under test)."""
    return PeftReference(model_dir, load_model(str(model_dir), "cpu", "float32"))


@pytest.fixture(scope="module")
def artifacts(fp32: LoadedModel) -> dict[int, PrefixArtifact]:
    return {n: random_artifact(fp32.spec, n, seed=300 + n, task=f"task-{n}") for n in LENGTHS}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(
    tmp_path_factory: pytest.TempPathFactory, artifacts: dict[int, PrefixArtifact]
) -> AsyncIterator[LocalPrefixStore]:
    store = LocalPrefixStore(tmp_path_factory.mktemp("gpu-vllm-store"))
    await store.start()
    for n, artifact in artifacts.items():
        await store.put("default", f"task-{n}", dump_artifact(artifact), {})
    yield store
    await store.close()


async def _batch(engine: object, requests: list[GenerationRequest]) -> dict[str, list[StreamEvent]]:
    async def collect(request: GenerationRequest) -> list[StreamEvent]:
        return [event async for event in engine.generate(request)]  # type: ignore[attr-defined]

    lists = await asyncio.gather(*(collect(r) for r in requests))
    return {r.request_id: events for r, events in zip(requests, lists, strict=True)}


def _mixed(max_new: int) -> list[GenerationRequest]:
    tasks: list[str | None] = [None, "task-1", "task-10", "task-200", "task-10", None]
    params = SamplingParams(max_new_tokens=max_new, top_n_tokens=1)
    return [
        GenerationRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], params, task=t) for i, t in enumerate(tasks)
    ]


async def test_fp32_with_cuda_graphs_equals_peft_for_mixed_tasks(
    fp32: LoadedModel,
    model_dir: Path,
    store: LocalPrefixStore,
    artifacts: dict[int, PrefixArtifact],
    peft: PeftReference,
) -> None:
    by_task: dict[str | None, PrefixArtifact | None] = {
        None: None,
        **{f"task-{n}": a for n, a in artifacts.items()},
    }
    engine = _engine(fp32, store, model_dir)
    await engine.start()  # type: ignore[attr-defined]
    try:
        requests = _mixed(12)
        results = await _batch(engine, requests)
    finally:
        await engine.stop(drain_timeout_s=0)  # type: ignore[attr-defined]
    for request in requests:
        events = results[request.request_id]
        tokens = [e.token_id for e in events if e.token_id is not None]
        prompt = fp32.tokenizer.encode(request.prompt)
        artifact = by_task[request.task]
        assert tokens == peft.generate(prompt, artifact, 12), request.request_id
        logprobs = torch.log_softmax(peft.step_logits(prompt, artifact, tokens[:-1]), dim=-1)
        for step, event in enumerate(e for e in events if e.token_id is not None):
            assert event.token_logprob == pytest.approx(float(logprobs[step, event.token_id]), abs=1e-3)


async def test_bf16_with_cuda_graphs_stays_within_bf16s_rounding_of_peft(
    fp32: LoadedModel,
    model_dir: Path,
    store: LocalPrefixStore,
    artifacts: dict[int, PrefixArtifact],
    peft: PeftReference,
) -> None:
    bf16 = load_model(str(model_dir), "cuda", "bfloat16")
    by_task: dict[str | None, PrefixArtifact | None] = {
        None: None,
        **{f"task-{n}": a for n, a in artifacts.items()},
    }
    engine = _engine(bf16, store, model_dir)
    await engine.start()  # type: ignore[attr-defined]
    try:
        requests = _mixed(8)
        results = await _batch(engine, requests)
    finally:
        await engine.stop(drain_timeout_s=0)  # type: ignore[attr-defined]
    wrong = 0.0
    for request in requests:
        tokens = [e.token_id for e in results[request.request_id] if e.token_id is not None]
        prompt = fp32.tokenizer.encode(request.prompt)
        artifact = by_task[request.task]
        logits = peft.step_logits(prompt, artifact, tokens[:-1])  # teacher-forced through PEFT in fp32
        for step, token in enumerate(tokens):
            assert float(logits[step].max() - logits[step, token]) <= 0.3, (request.request_id, step)
        if artifact is not None:
            bare = peft.step_logits(prompt, None, tokens[:-1])
            wrong = max(wrong, max(float(bare[s].max() - bare[s, t]) for s, t in enumerate(tokens)))
    assert wrong > 0.6, "the check could not tell a prefixed answer from the bare model's"


async def test_rows_rewritten_under_cuda_graphs_never_serve_the_old_prefix(
    fp32: LoadedModel, model_dir: Path, tmp_path: Path, peft: PeftReference
) -> None:
    store = LocalPrefixStore(tmp_path / "churn")
    await store.start()
    engine = _engine(fp32, store, model_dir)
    await engine.start()  # type: ignore[attr-defined]
    try:
        length = 400  # two of these cannot share a 600-row table: each takes the last one's rows
        answers = {}
        for seed in (1, 2, 3):
            g = torch.Generator().manual_seed(seed)
            shape = (fp32.spec.num_layers, 2, fp32.spec.num_heads, length, fp32.spec.head_dim)
            artifact = new_artifact({"decoder": torch.randn(shape, generator=g) * 1.5}, fp32.spec)
            await store.put("default", "churn", dump_artifact(artifact), {})
            request = GenerationRequest(
                f"c{seed}", PROMPTS[0], SamplingParams(max_new_tokens=8), task="churn"
            )
            tokens = [
                e.token_id for e in (await _batch(engine, [request]))[f"c{seed}"] if e.token_id is not None
            ]
            assert tokens == peft.generate(fp32.tokenizer.encode(PROMPTS[0]), artifact, 8), seed
            answers[seed] = tuple(tokens)
        assert len(set(answers.values())) == 3, "the three prefixes must answer differently"
    finally:
        await engine.stop(drain_timeout_s=0)  # type: ignore[attr-defined]
        await store.close()

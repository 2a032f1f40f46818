"""The vLLM backend keeps the engine contract: selection, abort, warm start, device residency."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from modeling.models import LoadedModel, load_model
from prefix_store.artifact import PrefixArtifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineError, GenerationRequest, SamplingParams
from server.main import build_engine, release_model_weights
from server.metrics import Metrics
from server.settings import Settings
from server.vllm_backend.engine import VllmEngine
from server.vllm_backend.worker import encode_prefix
from tests.vllm_backend.conftest import MAX_PREFIX_LENGTH, TABLE_ROWS

pytestmark = pytest.mark.asyncio(loop_scope="session")


def settings_for(model: Path, engine: str, tmp_path: Path) -> Settings:
    return Settings(_env_file=None, model=str(model), engine=engine, local_store_dir=tmp_path)  # type: ignore[call-arg]


async def test_selection_auto_vllm_native(
    h32: LoadedModel, h32_dir: Path, tiny_gpt2_dir: Path, tiny_bart_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    store = LocalPrefixStore(tmp_path / "store")
    metrics = Metrics()
    assert isinstance(build_engine(settings_for(h32_dir, "auto", tmp_path), h32, store, metrics), VllmEngine)
    assert isinstance(build_engine(settings_for(h32_dir, "native", tmp_path), h32, store, metrics), Engine)
    small = load_model(str(tiny_gpt2_dir), "cpu", "float32")  # head_dim 16
    with caplog.at_level(logging.INFO, logger="prefixserve.main"):
        chosen = build_engine(settings_for(tiny_gpt2_dir, "auto", tmp_path), small, store, metrics)
    assert isinstance(chosen, Engine)
    lines = [r.getMessage() for r in caplog.records if "engine: native" in r.getMessage()]
    assert len(lines) == 1 and "head_dim >= 32" in lines[0]
    with pytest.raises(EngineError, match="head_dim >= 32"):
        build_engine(settings_for(tiny_gpt2_dir, "vllm", tmp_path), small, store, metrics)
    bart = load_model(str(tiny_bart_dir), "cpu", "float32")
    with pytest.raises(EngineError, match="GPT-2 only"):
        build_engine(settings_for(tiny_bart_dir, "vllm", tmp_path), bart, store, metrics)
    assert isinstance(
        build_engine(settings_for(tiny_bart_dir, "auto", tmp_path), bart, store, metrics), Engine
    )


async def test_native_engine_settings_given_to_vllm_are_named_as_ignored(
    h32: LoadedModel, h32_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalPrefixStore(tmp_path / "store")

    def warnings_for(**given: object) -> list[str]:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, model=str(h32_dir), engine="vllm", local_store_dir=tmp_path, **given
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefixserve.main"):
            assert isinstance(build_engine(settings, h32, store, Metrics()), VllmEngine)
        return [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]

    assert warnings_for() == []
    assert warnings_for(max_batch_size=4, host_prefix_cache_bytes=1 << 20) == []  # both backends use these
    (line,) = warnings_for(kv_budget_tokens=3000, max_prefill_tokens=64, cuda_graphs=False)
    for name in ("PREFIXSERVE_MAX_PREFILL_TOKENS", "PREFIXSERVE_KV_BUDGET_TOKENS", "PREFIXSERVE_CUDA_GRAPHS"):
        assert name in line
    assert "DEVICE_PREFIX_CACHE_BYTES" not in line  # only what was given


async def test_a_server_on_vllm_keeps_no_copy_of_the_weights(h32_dir: Path, tmp_path: Path) -> None:
    """vLLM's engine core loads the weights; the API process drops its own (`server.main`), keeping
    what it serves with: the spec and its weights digest, the tokenizer."""
    store = LocalPrefixStore(tmp_path / "store")
    for backend in ("vllm", "native"):
        loaded = load_model(str(h32_dir), "cpu", "float32")
        spec = loaded.spec
        engine = build_engine(settings_for(h32_dir, backend, tmp_path), loaded, store, Metrics())
        release_model_weights(engine, loaded)
        devices = {p.device.type for p in loaded.model.parameters()}
        assert devices == ({"meta"} if backend == "vllm" else {"cpu"}), backend
        assert loaded.spec == spec and loaded.tokenizer.encode("Hello") == [15496]


async def test_abort_ends_the_request_and_frees_its_place(vllm_engine: VllmEngine) -> None:
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)
    handle = await vllm_engine.add_request(
        GenerationRequest("long", "Tell me a story", params, task="task-10")
    )
    first = await handle.__anext__()
    assert first.token_id is not None and vllm_engine.num_running == 1
    handle.abort()
    events = [event async for event in handle]
    assert events[-1].finish_reason == "cancelled" and events[-1].num_generated_tokens < 400
    assert vllm_engine.num_running == 0 and vllm_engine.num_waiting == 0
    # Its prefix rows are unpinned again (once vLLM has the abort): a later task may evict them.
    entry = vllm_engine.rows.get(("default", "task-10", 1))
    for _ in range(500):
        if entry is None or entry.pins == 0:
            break
        await asyncio.sleep(0.01)
    assert entry is not None and entry.pins == 0


async def test_a_request_ends_in_vllm_before_its_rows_can_be_reused(vllm_engine: VllmEngine) -> None:
    """Table rows freed while vLLM still ran the request (its prompt's virtual positions not all computed
    yet) could be rewritten with another task's prefix under it, and vLLM would cache the wrong keys under
    this task's salt: rows are released only once vLLM has the abort."""
    order: list[str] = []
    llm, rows = vllm_engine.llm, vllm_engine.rows
    real_abort, real_release = llm.abort, rows.release

    async def abort(*args: object, **kwargs: object) -> None:
        await real_abort(*args, **kwargs)
        order.append("vLLM aborted")

    def release(key: object) -> None:
        order.append("rows released")
        real_release(key)

    llm.abort, rows.release = abort, release
    try:
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        handle = await vllm_engine.add_request(GenerationRequest("ended", "Once", params, task="task-5"))
        assert (await handle.__anext__()).token_id is not None  # running in vLLM
        handle.abort()
        assert [event async for event in handle][-1].finish_reason == "cancelled"
        for _ in range(500):
            if "rows released" in order:
                break
            await asyncio.sleep(0.01)
        assert order == ["vLLM aborted", "rows released"]
    finally:
        del llm.abort, rows.release  # the instances' own methods again


async def test_a_requests_cache_salt_names_the_bytes_in_its_rows(
    vllm_engine: VllmEngine, h32_artifacts: dict[int, PrefixArtifact]
) -> None:
    """vLLM shares cached blocks between requests of one salt: a version number a store reissued with
    other bytes (a failover that lost writes) must not share them, so the salt carries the digest of
    the prefix bytes its rows were written with."""
    salts: list[str] = []
    llm = vllm_engine.llm
    real_generate = llm.generate

    def generate(prompt: dict[str, object], *args: object, **kwargs: object) -> object:
        salts.append(str(prompt.get("cache_salt")))
        return real_generate(prompt, *args, **kwargs)

    llm.generate = generate
    try:
        request = GenerationRequest("salted", "Hi", SamplingParams(max_new_tokens=2), task="task-5")
        _ = [event async for event in await vllm_engine.add_request(request)]
    finally:
        del llm.generate
    prefix = h32_artifacts[5].prefixes["decoder"]  # [layers, 2, H, L, D] -> rows [layers, 2, L, hidden]
    layers, _, heads, length, head_dim = prefix.shape
    rows = prefix.permute(0, 1, 3, 2, 4).reshape(layers, 2, length, heads * head_dim)
    digest = encode_prefix(rows, vllm_engine.loaded.dtype)[3]
    assert len(salts) == 1 and salts[0].startswith(f"default/task-5@1:{digest}#"), salts


async def test_vllm_queue_stays_bounded_and_everything_finishes(vllm_engine: VllmEngine) -> None:
    limits = vllm_engine.config.limits
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    seen_running: list[int] = []

    async def one(i: int) -> int:
        events = [
            e async for e in vllm_engine.generate(GenerationRequest(f"q{i}", "Hi", params, task="task-5"))
        ]
        seen_running.append(vllm_engine.num_running)
        return events[-1].num_generated_tokens

    counts = await asyncio.gather(*(one(i) for i in range(30)))
    assert counts == [6] * 30
    assert max(seen_running) <= limits.max_batch_size + limits.vllm_max_queued


async def test_warm_start_and_residency(vllm_engine: VllmEngine) -> None:
    # In prefixes of max_prefix_length (a floor: never below what the table holds now).
    floor = TABLE_ROWS // MAX_PREFIX_LENGTH
    assert vllm_engine.resident_prefix_capacity == max(floor, len(vllm_engine.resident_prefixes))
    assert await vllm_engine.warm("default", "task-1") is True
    assert ("default", "task-1") in vllm_engine.resident_prefixes
    assert await vllm_engine.warm("default", "no-such-task") is False
    assert await vllm_engine.warm("bad name!", "task-1") is False


async def test_a_request_that_reads_no_logprobs_gets_none_computed(vllm_engine: VllmEngine) -> None:
    """OpenAI requests without `logprobs` ask vLLM for none (no log-softmax over the vocabulary each
    step); the tokens are the same, and a request that reads them still gets every token's logprob."""

    async def run(token_logprobs: bool) -> list:
        params = SamplingParams(max_new_tokens=6, token_logprobs=token_logprobs)
        request = GenerationRequest(f"lp-{token_logprobs}", "Hello there", params, task="task-5")
        return [e async for e in vllm_engine.generate(request) if e.token_id is not None]

    without, with_ = await run(False), await run(True)
    assert [e.token_id for e in without] == [e.token_id for e in with_]
    assert all(e.token_logprob is None for e in without)
    assert all(e.token_logprob is not None and e.token_logprob <= 0 for e in with_)

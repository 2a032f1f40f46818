"""The vLLM backend computes what HF PEFT computes for each request alone (forward-pass reference),
whatever shares the batch: mixed tasks, prefix lengths 1 to 200, bare rows, staggered arrivals; and a
table row reused for another task or version never serves the old prefix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact, dump_artifact, new_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import GenerationRequest, SamplingParams, StreamEvent
from server.vllm_backend.engine import VllmEngine
from tests.engine.conftest import PeftReference
from tests.engine.test_engine_equivalence import run_staggered
from tests.vllm_backend.conftest import TABLE_ROWS

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "Table: name | Blue Spice ; food | Chinese ; area | city centre",
    "Summarize:",
    "x",
]


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, top_n_tokens=1)


async def collect(engine: VllmEngine, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in engine.generate(request)]


def check_against_peft(
    engine: VllmEngine,
    peft: PeftReference,
    requests: list[GenerationRequest],
    artifacts: dict[str | None, PrefixArtifact | None],
    results: dict[str, list[StreamEvent]],
) -> dict[str, list[int]]:
    """Tokens equal PEFT's greedy tokens for the request alone; each token's logprob equals PEFT's."""
    outputs = {}
    for req in requests:
        events = results[req.request_id]
        tokens = [e.token_id for e in events if e.token_id is not None]
        prompt_ids = engine.tokenizer.encode(req.prompt)
        artifact = artifacts[req.task]
        want = peft.generate(prompt_ids, artifact, req.params.max_new_tokens)
        assert tokens == want, f"{req.request_id} (task {req.task}) differs from PEFT alone"
        assert events[-1].finish_reason in ("length", "eos_token")
        assert events[-1].generated_text == "".join(e.text for e in events)
        assert all(e.num_prompt_tokens == len(prompt_ids) for e in events)  # net of the prefix
        logprobs = torch.log_softmax(peft.step_logits(prompt_ids, artifact, tokens[:-1]), dim=-1)
        want_lp = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
        got_lp = torch.tensor([e.token_logprob for e in events if e.token_id is not None])
        torch.testing.assert_close(got_lp, want_lp, atol=1e-3, rtol=0)
        outputs[req.request_id] = tokens
    return outputs


def by_task(artifacts: dict[int, PrefixArtifact]) -> dict[str | None, PrefixArtifact | None]:
    table: dict[str | None, PrefixArtifact | None] = {f"task-{n}": a for n, a in artifacts.items()}
    table[None] = None
    return table


async def test_greedy_equals_peft_mixed_tasks_staggered(
    vllm_engine: VllmEngine, h32_peft: PeftReference, h32_artifacts: dict[int, PrefixArtifact]
) -> None:
    tasks: list[str | None] = ["task-1", "task-5", "task-10", "task-200", None, "task-5", "task-200", None]
    max_new = [12, 5, 9, 16, 7, 14, 3, 10]
    requests = [
        GenerationRequest(f"st{i}", PROMPTS[i % len(PROMPTS)], greedy(max_new[i]), task=task)
        for i, task in enumerate(tasks)
    ]
    results = await run_staggered(vllm_engine, requests, join_after=2)  # type: ignore[arg-type]
    check_against_peft(vllm_engine, h32_peft, requests, by_task(h32_artifacts), results)


async def test_greedy_equals_peft_all_in_one_batch(
    vllm_engine: VllmEngine, h32_peft: PeftReference, h32_artifacts: dict[int, PrefixArtifact]
) -> None:
    prompt = PROMPTS[1]
    tasks: list[str | None] = [None, "task-1", "task-10", "task-200", None, "task-5"]
    requests = [GenerationRequest(f"b{i}", prompt, greedy(10), task=t) for i, t in enumerate(tasks)]
    lists = await asyncio.gather(*(collect(vllm_engine, r) for r in requests))
    results = {r.request_id: events for r, events in zip(requests, lists, strict=True)}
    outputs = check_against_peft(vllm_engine, h32_peft, requests, by_task(h32_artifacts), results)
    assert outputs["b0"] == outputs["b4"]
    distinct = {tuple(outputs[f"b{i}"]) for i in range(4)}
    assert len(distinct) == 4, "each task's prefix must steer the same prompt differently"
    assert results["b1"][0].prefix_version == 1 and results["b0"][0].prefix_version is None


def strong_artifact(engine: VllmEngine, length: int, seed: int) -> PrefixArtifact:
    """A prefix that steers the tiny model's greedy output away from other seeds'."""
    spec = engine.loaded.spec
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, spec.num_heads, length, spec.head_dim)
    return new_artifact({"decoder": torch.randn(shape, generator=g) * 1.5}, spec)


async def test_reused_rows_never_serve_the_old_prefix(
    vllm_engine: VllmEngine, vllm_store: LocalPrefixStore, h32_peft: PeftReference
) -> None:
    """Rows reused by a new version of a task, then by another task: every answer is its own prefix's.

    Prefixes of 250 positions in a table of 400 rows: each new one must take rows of the one before
    (pigeonhole), with the same prompt, so without the per-(task, version) `cache_salt` vLLM's prefix
    cache would hand the request the blocks computed from the old prefix."""
    prompt = PROMPTS[2]
    length = 250
    assert 2 * length > TABLE_ROWS
    v1, v2, other = (strong_artifact(vllm_engine, length, seed) for seed in (7, 8, 9))
    for key in vllm_engine.rows.resident():  # evict what earlier tests left: each prefix starts at row 0
        vllm_engine.rows.drop(key)
    await vllm_store.put("default", "flip", dump_artifact(v1), {})
    first = await collect(vllm_engine, GenerationRequest("f1", prompt, greedy(8), task="flip"))
    rows_v1 = vllm_engine.rows.get(("default", "flip", 1)).rows  # type: ignore[union-attr]
    await vllm_store.put("default", "flip", dump_artifact(v2), {})
    second = await collect(vllm_engine, GenerationRequest("f2", prompt, greedy(8), task="flip"))
    rows_v2 = vllm_engine.rows.get(("default", "flip", 2)).rows  # type: ignore[union-attr]
    await vllm_store.put("default", "other", dump_artifact(other), {})
    third = await collect(vllm_engine, GenerationRequest("f3", prompt, greedy(8), task="other"))
    rows_other = vllm_engine.rows.get(("default", "other", 1)).rows  # type: ignore[union-attr]
    fourth = await collect(vllm_engine, GenerationRequest("f4", prompt, greedy(8), task="flip"))
    # The rows really were reused, and the first block of virtual ids was the same.
    assert rows_v1[:32] == rows_v2[:32] and rows_v2[:32] == rows_other[:32]
    requests = [
        GenerationRequest("f1", prompt, greedy(8), task="v1"),
        GenerationRequest("f2", prompt, greedy(8), task="v2"),
        GenerationRequest("f3", prompt, greedy(8), task="other"),
        GenerationRequest("f4", prompt, greedy(8), task="v2"),
    ]
    results = {"f1": first, "f2": second, "f3": third, "f4": fourth}
    refs: dict[str | None, PrefixArtifact | None] = {"v1": v1, "v2": v2, "other": other}
    outputs = check_against_peft(vllm_engine, h32_peft, requests, refs, results)
    assert len({tuple(outputs[r]) for r in ("f1", "f2", "f3")}) == 3, "the prefixes must answer differently"
    assert [e.prefix_version for e in (first[0], second[0], fourth[0])] == [1, 2, 2]
    assert ("default", "flip") in vllm_engine.resident_prefixes


async def test_an_engine_on_a_shared_core_never_serves_the_last_engines_prefix(
    vllm_engine: VllmEngine,
    h32: LoadedModel,
    h32_peft: PeftReference,
    tmp_path: Path,
) -> None:
    """Two engines in turn over the session's vLLM core (as the API tests' vLLM pass builds them), each
    with its own store holding different bytes under the same (tenant, task, version): the second
    engine's fresh row allocator puts its prefix in the same rows, and vLLM's prefix cache, which
    outlives the first engine, must not hand it the first one's blocks."""
    prompt = PROMPTS[2]
    length = 64  # two full KV blocks of virtual ids
    outputs = []
    for seed in (11, 12):
        store = LocalPrefixStore(tmp_path / f"store-{seed}")
        await store.start()
        artifact = strong_artifact(vllm_engine, length, seed)
        await store.put("default", "same-name", dump_artifact(artifact), {})
        assert vllm_engine.core is not None
        engine = VllmEngine(h32, store, vllm_engine.config, core=vllm_engine.core)
        await engine.start()
        try:
            request = GenerationRequest(f"shared-{seed}", prompt, greedy(8), task="same-name")
            events = await collect(engine, request)
            rows = engine.rows.get(("default", "same-name", 1)).rows  # type: ignore[union-attr]
            tokens = check_against_peft(
                engine, h32_peft, [request], {"same-name": artifact}, {request.request_id: events}
            )[request.request_id]
            outputs.append((tokens, rows))
        finally:
            await engine.stop(drain_timeout_s=0)
            await store.close()
    assert outputs[0][1] == outputs[1][1], "both engines used the same rows"
    assert outputs[0][0] != outputs[1][0], "the two prefixes must answer differently"

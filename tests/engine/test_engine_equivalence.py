"""The engine computes what HF PEFT computes for each request alone, whatever else shares the batch."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
import torch

from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import PrefixArtifact, dump_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, EngineObserver, GenerationRequest, SamplingParams, StreamEvent
from server.limits import Limits
from tests.engine.conftest import PeftReference, greedy, random_artifact

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "Table: name | Blue Spice ; food | Chinese ; area | city centre",
    "Summarize:",
    "x",
]


class LogitsRecorder:
    """Collects each request's per-step logits from the engine's debug hook (worker thread)."""

    def __init__(self) -> None:
        self.by_request: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, request_ids: list[str], logits: torch.Tensor) -> None:
        for rid, row in zip(request_ids, logits, strict=True):
            self.by_request[rid].append(row.clone())


class StepSizes(EngineObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.num_tasks: list[int] = []

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.batch_sizes.append(batch_size)
        self.num_tasks.append(num_distinct_tasks)


async def run_staggered(
    engine: Engine, requests: list[GenerationRequest], join_after: int
) -> dict[str, list[StreamEvent]]:
    """Start request i once request i-1 has streamed `join_after` tokens (so joins land mid-generation)."""
    results: dict[str, list[StreamEvent]] = {}
    gates = [asyncio.Event() for _ in requests]
    gates[0].set()

    async def consume(i: int) -> None:
        await gates[i].wait()
        events: list[StreamEvent] = []
        async for event in engine.generate(requests[i]):
            events.append(event)
            if len(events) == join_after and i + 1 < len(gates):
                gates[i + 1].set()
        if i + 1 < len(gates):
            gates[i + 1].set()  # short requests must not block the next one
        results[requests[i].request_id] = events

    await asyncio.gather(*(consume(i) for i in range(len(requests))))
    return results


def check_against_peft(
    engine: Engine,
    peft_ref: PeftReference,
    recorder: LogitsRecorder,
    requests: list[GenerationRequest],
    artifacts_by_task: dict[str | None, PrefixArtifact | None],
    results: dict[str, list[StreamEvent]],
) -> dict[str, list[int]]:
    outputs = {}
    for req in requests:
        events = results[req.request_id]
        tokens = [e.token_id for e in events]
        prompt_ids = engine.tokenizer.encode(req.prompt)
        artifact = artifacts_by_task[req.task]
        want = peft_ref.generate(prompt_ids, artifact, req.params.max_new_tokens)
        assert tokens == want, f"{req.request_id} (task {req.task}) differs from PEFT alone"
        assert events[-1].finish_reason in ("length", "eos_token")
        assert events[-1].generated_text == "".join(e.text for e in events)
        got_logits = torch.stack(recorder.by_request[req.request_id])  # [steps, V]
        want_logits = peft_ref.step_logits(prompt_ids, artifact, tokens[:-1])
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)
        outputs[req.request_id] = tokens
    return outputs


async def test_greedy_equals_peft_alone_with_staggered_joins_and_finishes(
    make_engine: Any, store: Any, peft_ref: PeftReference, artifacts: dict[int, PrefixArtifact]
) -> None:
    tasks: list[str | None] = ["task-1", "task-5", "task-10", "task-200", None, "task-5", "task-200", None]
    max_new = [12, 5, 9, 16, 7, 14, 3, 10]  # different lengths: rows leave in a different order
    requests = [
        GenerationRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], greedy(max_new[i]), task=task)
        for i, task in enumerate(tasks)
    ]
    by_task: dict[str | None, PrefixArtifact | None] = {f"task-{n}": a for n, a in artifacts.items()}
    by_task[None] = None
    recorder = LogitsRecorder()
    observer = StepSizes()
    async with make_engine(store, observer=observer, max_batch_size=6) as engine:
        engine.debug_logits_hook = recorder
        results = await run_staggered(engine, requests, join_after=2)
    check_against_peft(engine, peft_ref, recorder, requests, by_task, results)
    # The test only means something if rows really shared steps with other tasks' rows.
    assert max(observer.batch_sizes) >= 4 and max(observer.num_tasks) >= 3


async def test_tasks_change_outputs_and_bare_rows_match_plain_hf(
    make_engine: Any, store: Any, peft_ref: PeftReference, artifacts: dict[int, PrefixArtifact]
) -> None:
    prompt = PROMPTS[1]
    tasks: list[str | None] = [None, "task-1", "task-10", "task-200", None]
    requests = [GenerationRequest(f"s{i}", prompt, greedy(10), task=t) for i, t in enumerate(tasks)]
    by_task: dict[str | None, PrefixArtifact | None] = {f"task-{n}": a for n, a in artifacts.items()}
    by_task[None] = None
    recorder = LogitsRecorder()
    async with make_engine(store) as engine:
        engine.debug_logits_hook = recorder
        lists = await asyncio.gather(*(_collect(engine, r) for r in requests))  # all in one batch
    results = {r.request_id: events for r, events in zip(requests, lists, strict=True)}
    outputs = check_against_peft(engine, peft_ref, recorder, requests, by_task, results)
    assert outputs["s0"] == outputs["s4"]  # the same bare request twice in one batch
    distinct = {tuple(outputs[f"s{i}"]) for i in range(4)}
    assert len(distinct) == 4, "each task's prefix must steer the same prompt differently"
    assert all(e.prefix_version == 1 for e in results["s1"]) and results["s0"][0].prefix_version is None


async def _collect(engine: Engine, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in engine.generate(request)]


@pytest.mark.slow
async def test_gpt2_shaped_model_equals_peft(tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = make_model_dir("gpt2", tmp_path_factory.mktemp("gpt2"), initializer_range=0.1)
    loaded: LoadedModel = load_model(str(model_dir), "cpu", "float32")
    ref = PeftReference(model_dir, loaded)
    store = LocalPrefixStore(tmp_path_factory.mktemp("gpt2-store"))
    arts = {n: random_artifact(loaded.spec, n, seed=n) for n in (10, 200)}
    for n, artifact in arts.items():
        await store.put("default", f"t{n}", dump_artifact(artifact), {})
    requests = [
        GenerationRequest("g0", PROMPTS[0], SamplingParams(max_new_tokens=8), task="t10"),
        GenerationRequest("g1", PROMPTS[2], SamplingParams(max_new_tokens=6), task="t200"),
        GenerationRequest("g2", PROMPTS[1], SamplingParams(max_new_tokens=8), task="t200"),
    ]
    by_task: dict[str | None, PrefixArtifact | None] = {"t10": arts[10], "t200": arts[200]}
    recorder = LogitsRecorder()
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=4)))
    await engine.start()
    try:
        engine.debug_logits_hook = recorder
        results = await run_staggered(engine, requests, join_after=2)
    finally:
        await engine.stop(drain_timeout_s=0)
    check_against_peft(engine, ref, recorder, requests, by_task, results)

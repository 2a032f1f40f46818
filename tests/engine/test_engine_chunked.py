"""Engine v2 behaviour: chunked prefill beside decoding streams, a task's version changing mid-batch,
and the KV budget in bytes, each still equal to PEFT for every request alone."""

from __future__ import annotations

import asyncio
from typing import Any

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact, dump_artifact
from server.engine import EngineObserver, GenerationRequest
from server.engine.paged_kv import PagedKVCache
from tests.engine.conftest import PeftReference, collect, greedy, random_artifact
from tests.engine.test_engine_behaviour import wait_until
from tests.engine.test_engine_equivalence import LogitsRecorder, check_against_peft

LONG_PROMPT = " ".join(f"word{i}" for i in range(40))  # ~80 tokens


class StepSpy:
    """Calls the real runner step and records what each step computed (decoding ids, chunks)."""

    def __init__(self, runner: Any) -> None:
        self.real = runner.step
        self.steps: list[tuple[set[str], list[tuple[str, int, int]]]] = []

    def __call__(self, tokens: dict[str, int], items: list[Any]) -> Any:
        chunks = [(it.request_id, it.start, it.end) for it in items]
        self.steps.append((set(tokens), chunks))
        return self.real(tokens, items)


async def test_running_streams_get_a_token_every_step_while_a_long_prompt_prefills(
    make_engine: Any, store: Any, peft_ref: PeftReference, artifacts: dict[int, PrefixArtifact]
) -> None:
    budget = 8
    requests = [
        GenerationRequest("a", "The quick brown fox", greedy(30), task="task-5"),
        GenerationRequest("b", "Summarize:", greedy(30), task="task-10"),
        GenerationRequest("long", LONG_PROMPT, greedy(6), task="task-5"),
    ]
    recorder = LogitsRecorder()
    async with make_engine(store, max_prefill_tokens=budget) as engine:
        spy = StepSpy(engine.runner)
        engine.runner.step = spy  # type: ignore[method-assign]
        engine.debug_logits_hook = recorder
        first = [engine.generate(r) for r in requests[:2]]
        events: dict[str, list[Any]] = {
            r.request_id: [await it.__anext__()] for r, it in zip(requests[:2], first, strict=True)
        }
        long_events = asyncio.create_task(collect(engine, requests[2]))
        for r, it in zip(requests[:2], first, strict=True):
            events[r.request_id] += [e async for e in it]
        events["long"] = await long_events
    by_task: dict[str | None, PrefixArtifact | None] = {f"task-{n}": a for n, a in artifacts.items()}
    check_against_peft(engine, peft_ref, recorder, requests, by_task, events)
    long_steps = [(decoding, c) for decoding, chunks in spy.steps for c in chunks if c[0] == "long"]
    num_long_tokens = len(engine.tokenizer.encode(LONG_PROMPT))
    assert len(long_steps) == -(-num_long_tokens // budget)  # the prompt went in budget-sized chunks
    assert all(end - start <= budget for _, (_, start, end) in long_steps)
    # Every step that computed a chunk of the long prompt also gave both running streams a token.
    assert all({"a", "b"} <= decoding for decoding, _ in long_steps)


async def test_a_new_version_coexists_with_the_old_until_its_last_row_finishes(
    make_engine: Any,
    store: Any,
    peft_ref: PeftReference,
    tiny: LoadedModel,
    artifacts: dict[int, PrefixArtifact],
) -> None:
    old, new = artifacts[10], random_artifact(tiny.spec, 7, seed=77)
    prompt = "Once upon a time"
    prompt_ids = tiny.tokenizer.encode(prompt)
    async with make_engine(store) as engine:
        # long enough to still run when the new version's first row joins (a fast step finishes 16 first)
        running = engine.generate(GenerationRequest("old", prompt, greedy(96), task="task-10"))
        old_events = [await running.__anext__()]
        await store.inner.put("default", "task-10", dump_artifact(new), {})  # version 2, mid-batch
        fresh = engine.generate(GenerationRequest("new", prompt, greedy(8), task="task-10"))
        new_events = [await fresh.__anext__()]
        pool = engine.runner.cache.prefixes  # type: ignore[attr-defined]
        both = sorted(pool.keys)  # both versions live, each once
        new_events += [e async for e in fresh]
        old_events += [e async for e in running]
        await wait_until(lambda: not pool.keys)  # the finished rows are released at the next step
        after = pool.keys
    assert both == [("default", "task-10", 1), ("default", "task-10", 2)]
    assert after == []
    assert {e.prefix_version for e in old_events} == {1} and {e.prefix_version for e in new_events} == {2}
    assert [e.token_id for e in old_events] == peft_ref.generate(prompt_ids, old, 96)
    assert [e.token_id for e in new_events] == peft_ref.generate(prompt_ids, new, 8)


class KVObserver(EngineObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.ratios: list[float] = []

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.batch_sizes.append(batch_size)
        self.ratios.append(kv_usage_ratio)


async def test_kv_budget_in_bytes_bounds_admission_and_is_reported(
    make_engine: Any, store: Any, tiny: LoadedModel
) -> None:
    spec = tiny.spec
    per_token = PagedKVCache.bytes_per_token(spec.num_layers, spec.num_heads, spec.head_dim, tiny.dtype)
    # Each request reserves prompt + max_new_tokens rounded up to 16-token blocks = 32 slots; the
    # budget holds 64 slots: at most two requests run at once, the others wait (and then run).
    observer = KVObserver()
    async with make_engine(store, observer=observer, kv_budget_bytes=64 * per_token) as engine:
        assert engine.runner.kv_capacity_tokens == 64
        requests = [GenerationRequest(f"r{i}", "Hello there", greedy(20, ignore_eos=True)) for i in range(5)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        await wait_until(lambda: engine.runner.kv_stats()["used_bytes"] == 0)  # blocks freed at the next step
        stats = engine.runner.kv_stats()
    assert all(len(events) == 20 for events in results)  # everyone was served
    assert max(observer.batch_sizes) == 2 and max(observer.ratios) == 1.0
    assert 0 < stats["peak_bytes"] <= 64 * per_token

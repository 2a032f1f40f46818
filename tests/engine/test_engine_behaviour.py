"""Streaming behaviour users see: sampling seeds, cancellation, stop conditions, limits, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modeling.models import LoadedModel, load_model
from prefix_store.artifact import PrefixArtifact
from server.engine import (
    Engine,
    EngineConfig,
    EngineObserver,
    EngineStopped,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    SamplingParams,
    UnknownTask,
)
from tests.engine.conftest import PeftReference, collect, greedy

PROMPT = "Once upon a time, in a land far away,"


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def sampled(seed: int | None, n: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=seed)


async def test_seeded_sampling_is_the_same_alone_and_in_any_batch(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        alone = await collect(engine, GenerationRequest("alone", PROMPT, sampled(1234), task="task-5"))
        others = [
            GenerationRequest(f"o{i}", f"Other prompt number {i}", sampled(i), task=t)
            for i, t in enumerate(["task-1", None, "task-200", "task-5"])
        ]
        batch = await asyncio.gather(
            *(collect(engine, r) for r in others[:2]),
            collect(engine, GenerationRequest("batched", PROMPT, sampled(1234), task="task-5")),
            *(collect(engine, r) for r in others[2:]),
        )
        other_seed = await collect(engine, GenerationRequest("s2", PROMPT, sampled(999), task="task-5"))
        unseeded = await collect(engine, GenerationRequest("u", PROMPT, sampled(None), task="task-5"))
    async with make_engine(store) as engine:  # a fresh engine: same seed, same tokens
        rerun = await collect(engine, GenerationRequest("again", PROMPT, sampled(1234), task="task-5"))
    tokens = [e.token_id for e in alone]
    assert [e.token_id for e in batch[2]] == tokens
    assert [e.token_id for e in rerun] == tokens
    assert [e.token_id for e in other_seed] != tokens
    assert all(e.seed == 1234 for e in alone)
    seed = unseeded[0].seed  # chosen by the engine, reported, and reproducible
    async with make_engine(store) as engine:
        replay = await collect(engine, GenerationRequest("r", PROMPT, sampled(seed), task="task-5"))
    assert [e.token_id for e in replay] == [e.token_id for e in unseeded]


async def test_consumer_breaking_out_frees_the_row_and_others_are_unaffected(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        reference = await collect(engine, GenerationRequest("ref", PROMPT, greedy(15), task="task-10"))
        leaver = engine.generate(GenerationRequest("leaver", "Bye", greedy(200), task="task-1"))
        stayer = asyncio.create_task(
            collect(engine, GenerationRequest("stay", PROMPT, greedy(15), task="task-10"))
        )
        got = 0
        async for _ in leaver:
            got += 1
            if got == 3:
                break
        await leaver.aclose()
        assert "leaver" not in engine.scheduler
        await wait_until(lambda: "leaver" not in engine.runner.request_ids)  # released at the next step
        stay = await stayer
    assert [e.token_id for e in stay] == [e.token_id for e in reference]
    assert stay[-1].finish_reason == "length"


async def test_cancelling_the_consuming_task_aborts_the_request(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(GenerationRequest("c", PROMPT, greedy(300), task="task-5")):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.num_running == 0 and engine.num_waiting == 0
        await wait_until(lambda: engine.runner.request_ids == [])


async def test_length_and_stop_sequence(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        full = await collect(engine, GenerationRequest("full", PROMPT, greedy(20), task="task-5"))
        assert full[-1].finish_reason == "length" and full[-1].num_generated_tokens == 20 and len(full) == 20
        text = full[-1].generated_text
        assert text and text == "".join(e.text for e in full)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = text.index(stop)
        events = await collect(
            engine,
            GenerationRequest("stop", PROMPT, greedy(20, stop=["zzzz-not-there", stop]), task="task-5"),
        )
    last = events[-1]
    assert last.finish_reason == "stop_sequence"
    assert last.generated_text == text[:cut]  # ends right before the stop string
    assert "".join(e.text for e in events) == text[:cut]  # streamed text never showed the stop string
    assert len(events) < 20


async def test_eos_token_ends_generation(tiny_dir: Any, store: Any, peft_ref: PeftReference) -> None:
    # A copy of the tiny model whose EOS id is a token the model really emits at step 3 for this prompt.
    loaded: LoadedModel = load_model(str(tiny_dir), "cpu")
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    natural = peft_ref.generate(prompt_ids, None, 6)
    eos = natural[3]
    assert eos not in natural[:3]
    loaded.model.config.eos_token_id = eos
    engine = Engine(loaded, store, EngineConfig())
    await engine.start()
    try:
        events = await collect(engine, GenerationRequest("e", PROMPT, greedy(20)))
    finally:
        await engine.stop(0)
    assert [e.token_id for e in events] == natural[:4]
    assert events[-1].finish_reason == "eos_token"
    eos_text = loaded.tokenizer.decode([eos])
    assert events[-1].text == "" and events[-1].generated_text == loaded.tokenizer.decode(natural[:3])
    assert not events[-1].generated_text.endswith(eos_text) or eos_text == ""


async def test_ignore_eos_generates_exactly_max_new_tokens(
    tiny_dir: Any, store: Any, peft_ref: PeftReference
) -> None:
    loaded: LoadedModel = load_model(str(tiny_dir), "cpu")
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    natural = peft_ref.generate(prompt_ids, None, 8)
    loaded.model.config.eos_token_id = natural[3]  # a token the model emits at step 3
    engine = Engine(loaded, store, EngineConfig())
    await engine.start()
    try:
        params = greedy(8)
        params.ignore_eos = True
        events = await collect(engine, GenerationRequest("e", PROMPT, params))
    finally:
        await engine.stop(0)
    assert [e.token_id for e in events] == natural[:8]  # went on past the EOS at step 3
    assert events[-1].finish_reason == "length"


async def test_prompt_too_long_names_the_numbers(make_engine: Any, store: Any) -> None:
    prompt = list(range(1000, 1300))  # 300 tokens
    async with make_engine(store) as engine:
        with pytest.raises(PromptTooLong) as err:
            await collect(engine, GenerationRequest("long", prompt, greedy(20), task="task-200"))
        msg = str(err.value)
        assert all(n in msg for n in ("300", "200", "20", "512"))
        # The same prompt fits without the prefix.
        events = await collect(engine, GenerationRequest("fits", prompt, greedy(2)))
        assert len(events) == 2


async def test_unknown_task(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        with pytest.raises(UnknownTask):
            await collect(engine, GenerationRequest("x", PROMPT, greedy(2), task="no-such-task"))
    async with make_engine(None) as engine:
        with pytest.raises(UnknownTask):
            await collect(engine, GenerationRequest("y", PROMPT, greedy(2), task="task-5"))


async def test_queue_full_and_queue_timeout(make_engine: Any, store: Any) -> None:
    async with make_engine(store, max_batch_size=1, max_waiting=1, queue_timeout_s=0.3) as engine:
        running = engine.generate(GenerationRequest("run", PROMPT, greedy(400)))
        await running.__anext__()  # admitted and generating: the only row is taken
        waiting = asyncio.create_task(collect(engine, GenerationRequest("wait", PROMPT, greedy(2))))
        while engine.num_waiting == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):
            await collect(engine, GenerationRequest("third", PROMPT, greedy(2)))
        with pytest.raises(QueueTimeout):
            await waiting
        await running.aclose()


async def test_one_failing_request_fails_alone(make_engine: Any, store: Any) -> None:
    async with make_engine(store) as engine:
        real_step = engine.runner.step

        def step(tokens: dict[str, int], items: list[Any]) -> Any:  # fault injection around the real runner
            if any(item.request_id == "bad" for item in items):
                raise RuntimeError("injected prefill failure")
            return real_step(tokens, items)

        engine.runner.step = step  # type: ignore[method-assign]
        good_alone = await collect(engine, GenerationRequest("alone", PROMPT, greedy(6), task="task-10"))
        results = await asyncio.gather(
            collect(engine, GenerationRequest("good", PROMPT, greedy(6), task="task-10")),
            collect(engine, GenerationRequest("bad", PROMPT, greedy(6), task="task-1")),
            return_exceptions=True,
        )
        assert isinstance(results[1], RequestFailed)
        assert [e.token_id for e in results[0]] == [e.token_id for e in good_alone]  # type: ignore[union-attr]
        assert engine.healthy
        await wait_until(lambda: engine.runner.request_ids == [])  # rows freed at the next step


async def test_a_broken_step_marks_the_engine_unhealthy_and_fails_everyone(
    make_engine: Any, store: Any
) -> None:
    async with make_engine(store) as engine:
        real_step = engine.runner.step

        def step(tokens: dict[str, int], items: list[Any]) -> Any:
            if tokens:  # every step that decodes running rows breaks
                raise RuntimeError("device lost")
            return real_step(tokens, items)

        engine.runner.step = step  # type: ignore[method-assign]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(collect(engine, GenerationRequest(f"r{i}", PROMPT, greedy(5))) for i in range(3)),
                return_exceptions=True,
            ),
            timeout=10,
        )
        assert all(isinstance(r, EngineStopped) for r in results)
        assert not engine.healthy and "device lost" in repr(engine.failure)
        with pytest.raises(EngineStopped):
            await collect(engine, GenerationRequest("late", PROMPT, greedy(2)))


async def test_stop_drains_then_cancels(make_engine: Any, store: Any, tiny: LoadedModel) -> None:
    engine = Engine(tiny, store, EngineConfig())
    await engine.start()
    short = asyncio.create_task(collect(engine, GenerationRequest("short", PROMPT, greedy(3))))
    endless = asyncio.create_task(collect(engine, GenerationRequest("endless", PROMPT, greedy(480))))
    await asyncio.sleep(0.05)
    await engine.stop(drain_timeout_s=0.2)
    assert (await short)[-1].finish_reason == "length"
    events = await endless
    assert events[-1].finish_reason == "cancelled" and events[-1].generated_text is not None
    with pytest.raises(EngineStopped):
        await collect(engine, GenerationRequest("after", PROMPT, greedy(2)))


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float]] = []
        self.finishes: list[tuple[Any, ...]] = []
        self.first_tokens = 0
        self.tokens = 0

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.steps.append((batch_size, num_distinct_tasks, kv_usage_ratio))

    def on_first_token(self, seconds: float) -> None:
        self.first_tokens += 1

    def on_token(self, inter_token_seconds: float) -> None:
        self.tokens += 1

    def on_finish(
        self, reason: str, prompt_tokens: int, generated_tokens: int, e2e: float, tenant: str, task: Any
    ) -> None:
        self.finishes.append((reason, generated_tokens, task))


async def test_observer_sees_mixed_batches(
    make_engine: Any, store: Any, artifacts: dict[int, PrefixArtifact]
) -> None:
    observer = Recorder()
    async with make_engine(store, observer=observer) as engine:
        requests = [
            GenerationRequest(f"m{i}", PROMPT, greedy(4), task=t)
            for i, t in enumerate(["task-1", "task-5", None])
        ]
        await asyncio.gather(*(collect(engine, r) for r in requests))
        assert engine.num_running == 0 and engine.running_tasks == []
    assert max(s[0] for s in observer.steps) == 3
    assert max(s[1] for s in observer.steps) == 3  # two tasks + the bare model in one step
    assert observer.first_tokens == 3 and observer.tokens == 9
    assert sorted(f[2] or "" for f in observer.finishes) == ["", "task-1", "task-5"]
    assert all(f[0] == "length" and f[1] == 4 for f in observer.finishes)


async def test_a_reused_request_id_never_gets_the_aborted_requests_token(make_engine: Any) -> None:
    import threading

    async with make_engine(None) as engine:
        want = [e.token_id for e in await collect(engine, GenerationRequest("ref", [5, 6, 7], greedy(3)))]
        calls, entered, gate = [0], threading.Event(), threading.Event()

        def hook(ids: list[str], logits: Any) -> None:  # worker thread
            if "dup" in ids and not gate.is_set():
                calls[0] += 1
                if calls[0] == 2:  # the first decode step of the first "dup": hold it
                    entered.set()
                    gate.wait(5)

        engine.debug_logits_hook = hook
        first = engine.generate(GenerationRequest("dup", [1, 2, 3, 4], greedy(50)))
        await first.__anext__()
        assert await asyncio.to_thread(entered.wait, 5)
        await first.aclose()  # aborted while its step runs; a new request takes the id at once
        second = asyncio.ensure_future(collect(engine, GenerationRequest("dup", [5, 6, 7], greedy(3))))
        await wait_until(lambda: engine.num_waiting == 1)
        gate.set()
        assert [e.token_id for e in await second] == want

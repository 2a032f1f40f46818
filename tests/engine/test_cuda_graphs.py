"""The static decode path (what CUDA graphs replay) computes what the eager step computes, on the CPU.

Graph capture itself needs CUDA (tests/gpu); here the capture function is a stand-in that replays the
step function on its static buffers, which checks what a graph depends on: each bucket key's own input
buffer, refreshed every step, the bound on captured keys, and the fallback to eager on a mismatch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest
import torch

from modeling import gpt2
from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine import Engine, EngineConfig, GenerationRequest
from server.engine.cuda_graphs import Replay, StaticDecoder
from server.engine.gpt2_runner import GPT2Runner
from server.engine.native_backend import NativeOptions
from server.engine.paged_kv import PagedKVCache, PrefixPool
from server.engine.prefix_arena import PrefixArena
from server.engine.runner import PrefillItem
from server.engine.static_decode import bucket_for, geometric_buckets
from server.limits import Limits
from tests.engine.conftest import PeftReference, collect, greedy
from tests.engine.static_scenario import Logits, pool_contents, run_scenario


def assert_same_logits(got: Logits, want: Logits) -> None:
    """Every step's logits within 1e-5 of the logits' scale (the two paths sum in different orders)."""
    assert got.keys() == want.keys()
    for rid in want:
        assert len(got[rid]) == len(want[rid]), rid
        for step, (g, w) in enumerate(zip(got[rid], want[rid], strict=True)):
            error, scale = float((g - w).abs().max()), max(1.0, float(w.abs().max()))
            assert error <= 1e-5 * scale, f"{rid} step {step}: |diff| {error:.2e} at scale {scale:.1f}"


@pytest.fixture(scope="module")
def eager_run(tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]) -> tuple[Logits, GPT2Runner]:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    assert runner.static_decoder is None  # CPU: graphs are ignored, no static path unless asked for
    return run_scenario(runner, artifacts), runner


def replaying_capture(calls: list[int]) -> Any:
    """A stand-in for graph capture: "replaying" runs the step function again, on the same buffers."""

    def capture(step: Replay) -> Replay:
        calls.append(1)
        return step

    return capture


def test_buckets() -> None:
    assert geometric_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert geometric_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert geometric_buckets(1000, unit=16)[:6] == [16, 32, 64, 128, 256, 384]
    assert geometric_buckets(1000, unit=16)[-1] == 1008  # max rounded up to whole blocks
    assert bucket_for(5, [1, 2, 4, 8]) == 8
    assert bucket_for(9, [1, 2, 4, 8]) is None


def test_static_decode_equals_the_eager_step(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact], eager_run: tuple[Logits, GPT2Runner]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4, static_decode=True)
    got = run_scenario(runner, artifacts)
    want, eager = eager_run
    assert_same_logits(got, want)
    assert runner.static_decoder is not None
    keys = runner.static_decoder.stats.keys_seen
    assert {k.rows for k in keys} == {2, 4, 8}  # 3 and 5 rows padded to buckets 4 and 8
    assert len({k.width for k in keys}) >= 3  # rows grew across width buckets
    # padding rows wrote nothing into other rows' KV; the pool holds what the eager step wrote
    for rid, (keys_, values) in pool_contents(eager).items():
        got_keys, got_values = pool_contents(runner)[rid]
        assert float((got_keys - keys_).abs().max()) <= 1e-5 * max(1.0, float(keys_.abs().max())), rid
        assert float((got_values - values).abs().max()) <= 1e-5 * max(1.0, float(values.abs().max())), rid
    runner.cache.check_invariants()


def test_a_full_prefix_arena_falls_back_to_the_eager_step(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact], eager_run: tuple[Logits, GPT2Runner]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    runner.static_decoder = decoder = StaticDecoder(runner, arena_tokens=16)  # a 200-token prefix never fits
    assert_same_logits(run_scenario(runner, artifacts), eager_run[0])
    assert 0 < decoder.stats.static_steps < 26  # steps without task-200 rows still took the static path


def test_graph_replays_read_each_steps_inputs_across_buckets(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact], eager_run: tuple[Logits, GPT2Runner]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    captures: list[int] = []
    runner.static_decoder = decoder = StaticDecoder(runner, capture=replaying_capture(captures), max_graphs=3)
    assert_same_logits(run_scenario(runner, artifacts), eager_run[0])
    assert decoder.graphs_enabled
    assert len(captures) == len(decoder.graphs) == 3  # bounded: later keys run eagerly
    assert len(decoder.stats.keys_seen) > 3
    assert decoder.stats.graph_replays > 0


@pytest.mark.parametrize("failure", ["wrong numbers", "capture raises"])
def test_a_graph_that_differs_from_eager_turns_graphs_off_for_good(
    tiny: LoadedModel,
    artifacts: dict[int, PrefixArtifact],
    eager_run: tuple[Logits, GPT2Runner],
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    captures: list[int] = []

    def broken_capture(step: Replay) -> Replay:
        captures.append(1)
        if failure == "capture raises":
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay() -> None:  # a graph that replays into the wrong numbers
            step()
            decoder.logits.add_(1.0)

        return replay

    runner.static_decoder = decoder = StaticDecoder(runner, capture=broken_capture)
    with caplog.at_level(logging.WARNING, logger="server.engine.cuda_graphs"):
        got = run_scenario(runner, artifacts)
    assert_same_logits(got, eager_run[0])  # the mismatching step returned the eager logits
    assert len(captures) == 1 and not decoder.graphs and not decoder.graphs_enabled
    assert decoder.stats.graph_replays == 0 and decoder.stats.static_steps == 26  # eager static from then on
    assert [r.message for r in caplog.records if "CUDA graphs are off" in r.message]


async def test_engine_on_the_static_path_equals_peft(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact], store: Any, peft_ref: PeftReference
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4, static_decode=True)
    engine = Engine(tiny, store, EngineConfig(Limits(max_batch_size=8)), runner=runner)
    await engine.start()
    try:
        tasks = ["task-5", None, "task-200", "task-1", "task-5", "task-10"]
        prompts = [[(50 + 11 * i + j) % 1000 for j in range(3 + 4 * i)] for i in range(len(tasks))]
        lengths = [12, 5, 9, 14, 3, 10]  # rows finish at different steps; later ones join mid-generation

        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.01 * i)
            req = GenerationRequest(f"r{i}", prompts[i], greedy(lengths[i]), task=tasks[i])
            return [e.token_id for e in await collect(engine, req)]

        served = await asyncio.gather(*(one(i) for i in range(len(tasks))))
    finally:
        await engine.stop(0)
    for i, task in enumerate(tasks):
        artifact = None if task is None else artifacts[int(task.split("-")[1])]
        assert served[i] == peft_ref.generate(prompts[i], artifact, lengths[i]), task
    assert runner.static_decoder is not None and runner.static_decoder.stats.static_steps > 0


def test_torch_compile_equals_eager(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact], eager_run: tuple[Logits, GPT2Runner]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4, torch_compile=True)  # on CPU too: the static path
    assert runner.static_decoder is not None and not runner.static_decoder.graphs_enabled
    assert_same_logits(run_scenario(runner, artifacts), eager_run[0])
    assert runner.static_decoder.stats.static_steps == 26


def test_a_compiled_step_that_fails_runs_uncompiled(
    tiny: LoadedModel,
    artifacts: dict[int, PrefixArtifact],
    eager_run: tuple[Logits, GPT2Runner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4, static_decode=True)
    assert runner.static_decoder is not None

    def no_compiler(*args: Any) -> Any:  # what a compiled function without a C compiler does
        raise RuntimeError("InductorError: no working C compiler found")

    runner.static_decoder.block_output = no_compiler
    with caplog.at_level(logging.WARNING, logger="server.engine.cuda_graphs"):
        assert_same_logits(run_scenario(runner, artifacts), eager_run[0])
    assert runner.static_decoder.block_output is gpt2.block_output
    assert len([r for r in caplog.records if "runs uncompiled" in r.message]) == 1


def test_prefix_arena_follows_the_pool() -> None:
    pool = PrefixPool()
    arena = PrefixArena(2, 2, 4, capacity=16, dtype=torch.float32, device=torch.device("cpu"))
    old, new, other = (torch.full((2, 2, 2, n, 4), float(v)) for n, v in ((6, 1), (6, 2), (8, 3)))
    pool.acquire("task", old)
    pool.acquire("other", other)
    assert arena.place(["task", "other"], pool) == {"task": (0, 6), "other": (6, 14)}
    pool.release("task")  # its last row left; a new version under the same key arrives
    pool.acquire("task", new)
    assert arena.place(["task"], pool) == {"task": (0, 6)}  # re-copied, not the stale span
    assert bool((arena.keys[:, :, 0:6] == 2.0).all()) and bool((arena.values[:, :, 6:14] == 3.0).all())
    pool.release("other")
    assert arena.place(["task"], pool) == {"task": (0, 6)} and arena.width == 6  # "other"'s span freed
    assert arena.place([], pool) == {}
    pool.acquire("big", torch.zeros(2, 2, 2, 11, 4))
    assert arena.place(["big"], pool) is None  # 6 + 11 > 16: the step runs eagerly


def test_the_static_paths_buffers_count_in_the_kv_budget(tiny: LoadedModel) -> None:
    per_block = (
        PagedKVCache.bytes_per_token(
            tiny.spec.num_layers, tiny.spec.num_heads, tiny.spec.head_dim, tiny.dtype
        )
        * 4
    )
    logits = 8 * tiny.spec.vocab_size * 4  # [max rows, V] float32
    budget = 16 * per_block + logits + 40 * per_block  # arena of 64 positions (16 blocks), logits, 40 blocks
    limits = Limits(
        max_batch_size=8, kv_budget_bytes=budget, static_prefix_arena_tokens=64, max_cuda_graphs=3
    )
    static = Engine(
        tiny, None, EngineConfig(limits), options=NativeOptions(kv_block_size=4, static_decode=True)
    )
    decoder = static.runner.static_decoder
    assert isinstance(decoder, StaticDecoder)
    assert decoder.arena.capacity == 64 and decoder.max_graphs == 3  # the Limits fields reach the decoder
    allocated = sum(
        t.numel() * t.element_size() for t in (decoder.arena.keys, decoder.arena.values, decoder.logits)
    )
    stats = static.kv_stats()
    assert stats["static_bytes"] == allocated == 16 * per_block + logits
    assert stats["capacity_bytes"] + stats["static_bytes"] <= budget  # all it allocates, within the budget
    assert stats["capacity_bytes"] == 40 * per_block and stats["bytes"] == stats["static_bytes"]
    eager = Engine(
        tiny, None, EngineConfig(limits), options=NativeOptions(kv_block_size=4, static_decode=False)
    ).kv_stats()
    assert eager["static_bytes"] == 0 and eager["capacity_bytes"] == budget // per_block * per_block
    with pytest.raises(ValueError, match="PREFIXSERVE_STATIC_PREFIX_ARENA_TOKENS"):
        Engine(
            tiny,
            None,
            EngineConfig(replace(limits, kv_budget_bytes=allocated)),
            options=NativeOptions(static_decode=True),
        )


def short_decode(runner: GPT2Runner) -> list[torch.Tensor]:
    """Two rows of 2 tokens without a prefix, then 4 decode steps (own widths 4 and 8, no arena)."""
    runner.step({}, [PrefillItem("x", [1, 2], None, None), PrefillItem("y", [3, 4], None, None)])
    return [runner.step({"x": 10 + i, "y": 20 + i}, [])[1] for i in range(4)]  # each [2, V]


def test_warm_up_captures_the_common_buckets_first_and_steps_replay_them(tiny: LoadedModel) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    captures: list[int] = []
    runner.static_decoder = decoder = StaticDecoder(
        runner, capture=replaying_capture(captures), max_graphs=20
    )
    keys = decoder.warm_up_keys()
    # narrow rows first, no prefix then a short one, every batch bucket; half the cap (10 of 20)
    assert [tuple(k) for k in keys] == [(b, 4, a) for a in (0, 4) for b in (1, 2, 4, 8)] + [
        (1, 8, 0),
        (2, 8, 0),
    ]
    runner.warm_up()
    assert list(decoder.graphs) == keys and len(captures) == 10 and decoder.stats.graph_replays == 0
    got = short_decode(runner)
    assert len(captures) == 10 and decoder.stats.graph_replays == 4  # every step replayed a warm graph
    want = short_decode(GPT2Runner(tiny, max_rows=8, block_size=4))  # the eager step
    for g, w in zip(got, want, strict=True):  # warm graphs read each step's inputs, not the dummy ones
        assert float((g - w).abs().max()) <= 1e-5 * max(1.0, float(w.abs().max()))


async def test_the_engine_warms_up_at_start_only_when_graphs_are_on(tiny: LoadedModel) -> None:
    for capture in (replaying_capture([]), None):
        runner = GPT2Runner(tiny, max_rows=8, block_size=4, static_decode=True)
        runner.static_decoder = StaticDecoder(runner, capture=capture, max_graphs=8)
        engine = Engine(tiny, None, EngineConfig(Limits(max_batch_size=8)), runner=runner)
        await engine.start()
        try:
            warm = len(runner.static_decoder.graphs)
            events = await collect(engine, GenerationRequest("r", [5, 6, 7], greedy(4, ignore_eos=True)))
        finally:
            await engine.stop(0)
        assert warm == (4 if capture else 0) and events[-1].finish_reason == "length"

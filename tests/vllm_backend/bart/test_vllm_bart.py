"""Our BART on vLLM computes what `modeling.bart_prefix` computes for each request alone, with the
paper's three prefix kinds in any combination and length, whatever shares the batch: other tasks,
bare requests, requests joining while others decode; and table rows rewritten for another task serve
the new prefix."""

from __future__ import annotations

import asyncio

import pytest
import torch

from modeling.models import LoadedModel
from tests.vllm_backend.bart.conftest import MAX_PREFIX_LENGTH, random_prefixes
from tests.vllm_backend.bart.driver import BartVllm, Generated, Prefixes, assert_same, reference

pytestmark = pytest.mark.asyncio(loop_scope="session")


def source(seed: int, length: int) -> list[int]:
    return torch.randint(0, 50000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_each_prefix_kind_alone_equals_the_reference(
    bart_vllm: BartVllm, bart: LoadedModel, bart_tasks: dict[str, Prefixes | None]
) -> None:
    """One request at a time, the same source for every task: each equals the reference, and each
    task's prefix steers the source differently (so the check can tell the kinds apart)."""
    src = source(1, 9)
    outputs = {}
    for name, prefixes in bart_tasks.items():
        rows = await bart_vllm.load(prefixes)
        got = await bart_vllm.generate(src, rows, max_new=12)
        assert_same(got, reference(bart.model, src, prefixes, 12), name)
        outputs[name] = tuple(got.tokens)
    assert len(set(outputs.values())) == len(outputs), outputs


async def test_mixed_tasks_bare_and_staggered_joins_equal_each_alone(
    bart_vllm: BartVllm, bart: LoadedModel, bart_tasks: dict[str, Prefixes | None]
) -> None:
    """Every task twice plus bare requests, sources of 3 to 60 tokens, 6 to 16 new tokens: the first
    half starts together, each later one when the one before has 3 tokens (joins mid-decode, so steps
    mix encoder runs with decoding rows, and more requests than the batch's 8 rows)."""
    names = [*bart_tasks, *bart_tasks]
    rows = {name: await bart_vllm.load(bart_tasks[name]) for name in bart_tasks}
    requests = [(name, source(10 + i, 3 + (i * 7) % 58), 6 + (i * 5) % 11) for i, name in enumerate(names)]
    half = len(requests) // 2
    gates = [asyncio.Event() for _ in requests]
    for gate in gates[: half + 1]:
        gate.set()
    results: dict[int, Generated] = {}

    async def run(i: int) -> None:
        name, src, max_new = requests[i]
        await gates[i].wait()

        def opened(count: int) -> None:
            if count >= 3 and i + 1 < len(gates):
                gates[i + 1].set()

        results[i] = await bart_vllm.generate(src, rows[name], max_new, on_tokens=opened)
        if i + 1 < len(gates):
            gates[i + 1].set()

    await asyncio.gather(*(run(i) for i in range(len(requests))))
    for i, (name, src, max_new) in enumerate(requests):
        assert_same(
            results[i], reference(bart.model, src, bart_tasks[name], max_new), f"request {i} ({name})"
        )


async def test_rows_rewritten_for_another_task_serve_the_new_prefix(
    bart_vllm: BartVllm, bart: LoadedModel
) -> None:
    """The engine reuses table rows (LRU): a prefix written over another's rows, kinds and lengths
    changed, is what the next request gets."""
    src = source(3, 12)
    first = random_prefixes(bart, (8, 8, 8), seed=31)
    second = random_prefixes(bart, (3, 8, 5), seed=32)
    rows = list(range(900, 908))
    got_first = await bart_vllm.generate(src, await bart_vllm.load(first, rows), max_new=8)
    got_second = await bart_vllm.generate(src, await bart_vllm.load(second, rows), max_new=8)
    assert_same(got_first, reference(bart.model, src, first, 8), "first")
    assert_same(got_second, reference(bart.model, src, second, 8), "second")
    assert got_first.tokens != got_second.tokens


async def test_longest_source_with_the_longest_cross_prefix(bart_vllm: BartVllm, bart: LoadedModel) -> None:
    """A source filling every encoder position, beside a cross prefix of the longest length: the
    cross-attention keys (prefix + source) outnumber max_model_len, and still equal the reference."""
    positions = int(bart.model.config.max_position_embeddings)
    src = source(4, positions - 2)  # + bos/eos fills the encoder
    prefixes = random_prefixes(bart, (MAX_PREFIX_LENGTH, 2, MAX_PREFIX_LENGTH), seed=41)
    got = await bart_vllm.generate(src, await bart_vllm.load(prefixes), max_new=6)
    assert_same(got, reference(bart.model, src, prefixes, 6), "longest")

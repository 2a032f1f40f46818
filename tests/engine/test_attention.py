"""Shared-prefix attention in both prefix layouts against plain softmax over each row's concatenation
[its prefix | its own tokens], and the GPT-2 runner in both layouts against the plain model forward."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from modeling import gpt2
from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.attention import cascade_attention
from server.engine.gpt2_runner import GPT2Runner
from server.engine.paged_kv import PrefixPool
from server.engine.prefix_layout import attention_bias, plan_layout
from server.engine.runner import PrefillItem

H, D = 2, 8


def reference(
    q: torch.Tensor, prefix: torch.Tensor | None, own_k: torch.Tensor, own_v: torch.Tensor, first: int
) -> torch.Tensor:
    """One row, float64: q [H, Q, D]; prefix [2, H, L, D] or None; own [H, S, D]; query i sees own [0, first+i]."""
    out = []
    for i in range(q.shape[1]):
        keys, values = own_k[:, : first + i + 1], own_v[:, : first + i + 1]  # [H, s, D]
        if prefix is not None:
            keys, values = torch.cat([prefix[0], keys], 1), torch.cat([prefix[1], values], 1)
        p = torch.softmax(q[:, i : i + 1].double() @ keys.double().transpose(-1, -2) * 0.3, dim=-1)
        out.append(p @ values.double())  # [H, 1, D]
    return torch.cat(out, 1)  # [H, Q, D]


# (prefix key of each row, grouped), prefix length per key, queries per row
CASES = [
    (["a", "a", "a", "b", None, None, "c"], {"a": 3, "b": 7, "c": 1}, 1),  # decode, mixed, no-prefix rows
    (["a"] * 5, {"a": 4}, 1),  # one task
    (["a", "b", "b", "c", "c", "c", "c"], {"a": 5, "b": 2, "c": 9}, 3),  # prefill chunks (Q > 1)
    ([None, "a", "a"], {"a": 6}, 4),
]


@pytest.mark.parametrize("choice", ["concat", "grid"])
@pytest.mark.parametrize(("row_keys", "lengths", "num_queries"), CASES)
def test_both_layouts_equal_softmax_over_the_concatenation(
    choice: str, row_keys: list[Hashable | None], lengths: dict[Hashable, int], num_queries: int
) -> None:
    g = torch.Generator().manual_seed(len(row_keys) * 10 + num_queries)
    layers = 1
    pool = PrefixPool()
    prefixes = {k: torch.randn(layers, 2, H, n, D, generator=g) for k, n in lengths.items()}
    for key in row_keys:
        if key is not None:
            pool.acquire(key, prefixes[key])
    R, Q = len(row_keys), num_queries
    firsts = [int(f) for f in torch.randint(0, 6, (R,), generator=g)]  # own index of each row's first query
    S = max(firsts) + Q
    q = torch.randn(R, H, Q, D, generator=g)
    own_k, own_v = torch.randn(R, H, S, D, generator=g), torch.randn(R, H, S, D, generator=g)

    layout = plan_layout(row_keys, lengths, S, choice)
    assert layout is not None and layout.grid == (choice == "grid")
    slots = torch.tensor(layout.slot_rows)  # [slots]
    keys, values = pool.stacked(layout, torch.float32)
    bias = attention_bias(
        torch.tensor(firsts)[slots],
        torch.tensor(layout.lo),
        torch.tensor(layout.hi),
        Q,
        S,
        layout.width,
        torch.float32,
    )
    out = cascade_attention(
        q[slots].transpose(0, 1),  # head-major [H, slots, Q, D]
        own_k[slots].transpose(0, 1),
        own_v[slots].transpose(0, 1),
        bias,
        keys[0],
        values[0],
        0.3,
    ).transpose(0, 1)[torch.tensor(layout.row_slots)]  # [R, H, Q, D]

    for r, key in enumerate(row_keys):
        prefix = None if key is None else prefixes[key][0]
        want = reference(q[r], prefix, own_k[r], own_v[r], firsts[r])
        torch.testing.assert_close(out[r].double(), want, atol=1e-5, rtol=1e-5)


def test_auto_layout_pays_per_task_products_only_where_prefixes_are_long() -> None:
    long_tasks = [t for t in "abcd" for _ in range(16)]  # 64 rows over 4 tasks of L = 200
    grid = plan_layout(long_tasks, dict.fromkeys("abcd", 200), own_width=100)
    assert grid is not None and grid.grid and grid.identity  # equal groups: no reordering either
    one_task = plan_layout(["a"] * 8, {"a": 200}, own_width=100)
    assert one_task is not None and not one_task.grid and one_task.identity
    assert plan_layout([None, None], {}, own_width=4) is None  # no prefix: plain attention


@pytest.mark.parametrize("choice", ["concat", "grid"])
def test_runner_in_either_layout_equals_the_plain_forward_through_joins_and_leaves(
    choice: str, tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    runner.prefix_layout = choice
    specs = {
        "a": ([5, 6, 7, 8], artifacts[5]),
        "b": ([100, 200], None),
        "c": (list(range(300, 320)), artifacts[10]),
        "d": ([9, 10], artifacts[5]),
        "e": ([42, 43, 44], artifacts[1]),
    }
    fed = {rid: list(ids) for rid, (ids, _) in specs.items()}

    def item(rid: str, start: int = 0, end: int | None = None) -> PrefillItem:
        ids, artifact = specs[rid]
        key = None if artifact is None else ("t", artifact.prefix_length())
        return PrefillItem(rid, ids, artifact, key, start, end)

    def check(ids: list[str], logits: torch.Tensor) -> None:
        for rid, got in zip(ids, logits, strict=True):
            artifact = specs[rid][1]
            prefix = None if artifact is None else artifact.prefixes["decoder"]
            want = gpt2.forward(tiny.model, torch.tensor([fed[rid]]), prefix_kv=prefix)[0, -1]  # [V]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    def step(*chunks: PrefillItem) -> None:
        tokens = {r: int(fed[r][-1]) * 3 % 500 for r in runner.request_ids}
        for r, t in tokens.items():
            fed[r].append(t)
        with torch.no_grad():
            check(*runner.step(tokens, list(chunks)))

    step(item("a"), item("b"), item("c", 0, 6))
    step(item("c", 6, 13), item("d"))
    step(item("c", 13), item("e"))
    step()
    runner.release(["a", "e"])
    step()
    runner.release(["b"])
    step()
    runner.cache.check_invariants()


def test_stacked_prefix_copies_are_reported_and_leave_with_their_rows(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    runner.prefill([PrefillItem("a", [1, 2, 3], artifacts[5], ("t", 5))])
    runner.decode(torch.tensor([7]))
    assert runner.kv_stats()["prefix_stack_bytes"] == 0  # one task: its prefix is read in place
    runner.prefill([PrefillItem("b", [1, 2], artifacts[10], ("t", 10))])
    runner.decode(torch.tensor([7, 8]))
    both = artifacts[5].prefixes["decoder"].nbytes + artifacts[10].prefixes["decoder"].nbytes
    assert runner.kv_stats()["prefix_stack_bytes"] >= both  # two tasks: a stacked copy of both
    runner.release(["a", "b"])
    assert runner.kv_stats()["prefix_stack_bytes"] == 0

"""The paged KV layout (rows' own tokens in blocks, one shared copy per prefix), checked against HF's
own cache for each request alone, through the GPT-2 runner."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.gpt2_runner import GPT2Runner
from server.engine.paged_kv import PagedKVCache
from server.engine.runner import PrefillItem


def reference_kv(
    loaded: LoadedModel, artifact: PrefixArtifact | None, ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own cache for one request alone: prefix then `ids` at positions L..: [layers, H, L+T, D] each."""
    cache = DynamicCache(config=loaded.model.config)
    length = 0
    if artifact is not None:
        prefix = artifact.prefixes["decoder"]
        length = prefix.shape[3]
        for layer in range(prefix.shape[0]):
            cache.update(prefix[layer, 0][None], prefix[layer, 1][None], layer)
    with torch.no_grad():
        loaded.model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(length, length + len(ids))[None],
            past_key_values=cache,
            use_cache=True,
        )
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


def own_kv(cache: PagedKVCache, request_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's own tokens gathered from its blocks: [layers, H, length, D] each."""
    slots = torch.tensor(cache.slots(request_id, cache.rows[request_id].length))
    return cache.keys[:, :, slots], cache.values[:, :, slots]  # the pool is head-major


def test_rows_match_requests_alone_after_joins_chunks_and_leaves(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)  # small blocks: rows span many blocks
    cache = runner.cache
    fed: dict[str, list[int]] = {}  # every id written to the cache, per request
    specs = {
        "a": ([5, 6, 7, 8], artifacts[5]),
        "b": ([100, 200], None),
        "c": (list(range(300, 340)), artifacts[200]),
        "d": ([9], artifacts[1]),
        "e": ([42, 43, 44], artifacts[5]),  # the same task as "a": shares its prefix
    }

    def item(rid: str, start: int = 0, end: int | None = None) -> PrefillItem:
        ids, artifact = specs[rid]
        key = None if artifact is None else ("t", artifact.prefix_length())
        return PrefillItem(rid, ids, artifact, key, start, end)

    def step(*chunks: PrefillItem) -> None:
        order = runner.request_ids
        tokens = {r: 1000 + 7 * len(fed[r]) + i for i, r in enumerate(order)}
        runner.step(tokens, list(chunks))
        for r, t in tokens.items():
            fed[r].append(t)
        for c in chunks:
            fed.setdefault(c.request_id, [])
            fed[c.request_id] += specs[c.request_id][0][c.start : c.end]

    step(item("a"), item("b"))
    step(item("c", 0, 7))  # "c" prefills in chunks while "a" and "b" decode
    assert "c" not in runner.request_ids  # still prefilling: it does not decode yet
    step(item("c", 7, 19))
    step(item("c", 19))
    runner.release(["a"])  # a row leaves: its blocks are freed, nothing moves
    cache.check_invariants()
    step(item("d"), item("e"))
    step()
    runner.release(["b"])
    step()
    cache.check_invariants()
    assert sorted(cache.rows) == ["c", "d", "e"]

    for rid, row in cache.rows.items():
        ids, artifact = specs[rid]
        assert row.length == len(fed[rid])
        want_k, want_v = reference_kv(tiny, artifact, fed[rid])
        got_k, got_v = own_kv(cache, rid)
        prefix_len = row.prefix_length
        torch.testing.assert_close(got_k, want_k[:, :, prefix_len:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_v, want_v[:, :, prefix_len:], atol=1e-5, rtol=1e-5)
        if artifact is not None:  # the prefix is the artifact's own tensor, not a copy
            shared = cache.prefixes.get(row.prefix_key)
            assert shared.data_ptr() == artifact.prefixes["decoder"].data_ptr()


def test_prefix_memory_grows_with_distinct_task_versions_not_with_rows(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    runner = GPT2Runner(tiny, max_rows=32, block_size=4)
    one = artifacts[10].prefixes["decoder"].nbytes
    runner.prefill([PrefillItem(f"x{i}", [1, 2, 3], artifacts[10], ("t10", 1)) for i in range(8)])
    assert runner.kv_stats()["prefix_bytes"] == one  # 8 rows, one task: one copy
    runner.prefill([PrefillItem(f"y{i}", [1, 2, 3], artifacts[10], ("t10", 1)) for i in range(16)])
    assert runner.kv_stats()["prefix_bytes"] == one  # 24 rows, still one copy
    v2 = artifacts[10].to("cpu", torch.float32)  # the same task's next version: its own copy
    runner.prefill([PrefillItem("z", [1, 2, 3], v2, ("t10", 2))])
    assert runner.kv_stats()["prefix_bytes"] == 2 * one and runner.kv_stats()["prefix_entries"] == 2
    runner.release([f"x{i}" for i in range(8)] + [f"y{i}" for i in range(16)])
    assert runner.kv_stats()["prefix_bytes"] == one  # the old version went with its last row
    runner.cache.check_invariants()


def test_rows_memory_follows_tokens_and_leaving_moves_nothing(tiny: LoadedModel) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    cache = runner.cache
    runner.prefill([PrefillItem("long", list(range(40))), PrefillItem("short", [1, 2])])
    assert cache.num_used_blocks == 10 + 1
    before = own_kv(cache, "short")
    slots = cache.slots("short", 2)
    runner.release(["long"])
    assert cache.num_used_blocks == 1 and cache.used_bytes == cache.block_bytes
    assert cache.slots("short", 2) == slots  # nothing moved
    assert all(torch.equal(a, b) for a, b in zip(own_kv(cache, "short"), before, strict=True))
    runner.prefill([PrefillItem("next", [3, 4, 5])])
    assert max(cache.rows["next"].blocks) < 10  # freed blocks are reused, lowest first
    cache.check_invariants()


def test_a_bad_chunk_changes_nothing(tiny: LoadedModel) -> None:
    runner = GPT2Runner(tiny, max_rows=8, block_size=4)
    runner.step({}, [PrefillItem("a", list(range(10)), end=4)])
    with pytest.raises(ValueError, match="does not follow"):  # a chunk that skips tokens
        runner.step({}, [PrefillItem("a", list(range(10)), start=6), PrefillItem("b", [1, 2])])
    assert runner.cache.rows["a"].length == 4 and "b" not in runner.cache.rows
    runner.cache.check_invariants()


def test_pool_too_small_is_a_clear_error_and_changes_nothing(tiny: LoadedModel) -> None:
    per_token = PagedKVCache.bytes_per_token(
        tiny.spec.num_layers, tiny.spec.num_heads, tiny.spec.head_dim, tiny.dtype
    )
    runner = GPT2Runner(tiny, max_rows=8, kv_budget_bytes=8 * per_token, block_size=4)  # two blocks
    runner.prefill([PrefillItem("a", [1, 2, 3])])
    with pytest.raises(MemoryError, match="KV pool exhausted"):
        runner.prefill([PrefillItem("b", list(range(9)))])
    assert list(runner.cache.rows) == ["a"] and runner.cache.num_used_blocks == 1
    runner.cache.check_invariants()

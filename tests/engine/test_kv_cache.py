"""The slot KV cache's layout rule and bookkeeping, checked against K/V computed for each request alone."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.gpt2_runner import GPT2Runner
from server.engine.kv_cache import SlotKVCache
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
            cache=cache,
            use_cache=True,
        )
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


def test_rows_match_requests_alone_after_joins_and_leaves(
    tiny: LoadedModel, artifacts: dict[int, PrefixArtifact]
) -> None:
    runner = GPT2Runner(tiny, max_rows=8, position_chunk=16)  # small chunks: growth happens in the test
    cache = runner.cache
    fed: dict[str, list[int]] = {}  # every id written to the cache, per request
    specs = {
        "a": ([5, 6, 7, 8], artifacts[5]),
        "b": ([100, 200], None),
        "c": (list(range(300, 340)), artifacts[200]),
        "d": ([9], artifacts[1]),
        "e": ([42, 43, 44], artifacts[10]),
    }

    def join(*rids: str) -> None:
        items = [PrefillItem(r, specs[r][0], specs[r][1]) for r in rids]
        runner.prefill(items)
        for r in rids:
            fed[r] = list(specs[r][0])

    def step() -> None:
        order = runner.request_ids
        tokens = [1000 + 7 * len(fed[r]) + i for i, r in enumerate(order)]
        runner.decode(torch.tensor(tokens))
        for r, t in zip(order, tokens, strict=True):
            fed[r].append(t)

    join("a", "b")
    step()
    join("c")
    step()
    runner.release(["a"])  # a middle/first row leaves: the last row moves into its slot
    cache.check_invariants()
    assert cache.request_ids == ["c", "b"]
    join("d", "e")
    step()
    step()
    runner.release(["e"])  # the last row leaves: nothing moves
    step()
    cache.check_invariants()
    assert sorted(cache.request_ids) == ["b", "c", "d"]
    assert cache.num_reallocations >= 2  # grew in rows/positions along the way

    for row, rid in enumerate(cache.request_ids):
        ids, artifact = specs[rid]
        prefix_len = 0 if artifact is None else artifact.prefix_length()
        assert cache.lengths[row] == prefix_len + len(fed[rid])
        assert cache.row_by_request_id[rid] == row
        want_k, want_v = reference_kv(tiny, artifact, fed[rid])
        n = cache.lengths[row]
        torch.testing.assert_close(cache.keys[:, row, :, :n], want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.values[:, row, :, :n], want_v, atol=1e-5, rtol=1e-5)
        if artifact is not None:  # the prefix sits verbatim at indices [0, L)
            assert torch.equal(cache.keys[:, row, :, :prefix_len], artifact.prefixes["decoder"][:, 0])


def test_capacity_grows_in_chunks_and_shrinks_when_rows_leave() -> None:
    cache = SlotKVCache(
        2, 2, 4, max_rows=32, max_positions=1024, dtype=torch.float32, device=torch.device("cpu")
    )
    cache.add_rows(["a"], [10])
    assert (cache.row_capacity, cache.position_capacity) == (8, 256)
    cache.add_rows([f"r{i}" for i in range(10)], [300] * 10)
    assert (cache.row_capacity, cache.position_capacity) == (16, 512)
    for i in range(10):
        cache.remove(f"r{i}")
    cache.check_invariants()
    assert cache.request_ids == ["a"]
    assert (cache.row_capacity, cache.position_capacity) == (8, 256)  # memory follows what runs


def test_remove_moves_the_last_row_only() -> None:
    cache = SlotKVCache(
        1, 1, 2, max_rows=8, max_positions=64, dtype=torch.float32, device=torch.device("cpu")
    )
    cache.add_rows(["a", "b", "c"], [3, 4, 5])
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for row in range(3):
            cache.keys[:, row, :, : cache.lengths[row]] = float(row + 1)
    cache.remove("a")
    assert cache.request_ids == ["c", "b"] and cache.lengths == [5, 4]
    assert torch.all(cache.keys[0, 0, :, :5] == 3.0)  # c's data moved to row 0
    assert torch.all(cache.keys[0, 1, :, :4] == 2.0)  # b untouched
    cache.check_invariants()


def test_join_and_leave_at_a_chunk_boundary_does_not_reallocate_each_time() -> None:
    cache = SlotKVCache(
        1, 1, 2, max_rows=32, max_positions=1024, dtype=torch.float32, device=torch.device("cpu")
    )
    cache.add_rows([f"r{i}" for i in range(8)], [10] * 8)  # exactly one row chunk
    cache.add_rows(["x0"], [10])  # the 9th row: grows to 16 rows
    grown = cache.num_reallocations
    for i in range(1, 6):  # requests keep joining and leaving around 8-9 rows
        cache.remove(f"x{i - 1}")
        cache.add_rows([f"x{i}"], [10])
    cache.check_invariants()
    assert cache.num_reallocations == grown  # no shrink/grow ping-pong
    assert cache.row_capacity == 16

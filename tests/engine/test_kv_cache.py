"""The slot KV cache (BART's decoder and cross caches): growth, shrink and row moves."""

from __future__ import annotations

import torch

from server.engine.kv_cache import SlotKVCache


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

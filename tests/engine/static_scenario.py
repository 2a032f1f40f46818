"""A decode scenario for comparing runners step by step: joins, finishes, mixed tasks, no-prefix rows,
prefixes of lengths 1, 5 and 200, batch sizes crossing buckets, and rows growing across width buckets.

Tokens fed back are fixed by the scenario (not sampled), so two runners see the same inputs whatever
their logits; used by the CPU tests (static path vs eager) and the GPU tests (graphs on vs off).
"""

from __future__ import annotations

import torch

from prefix_store.artifact import PrefixArtifact
from server.engine.gpt2_runner import GPT2Runner
from server.engine.runner import PrefillItem

Logits = dict[str, list[torch.Tensor]]  # request id -> logits [V] of each step it was sampled in


def run_scenario(runner: GPT2Runner, artifacts: dict[int, PrefixArtifact]) -> Logits:
    """Drive `runner` through the scenario; every step's logits per request (on the CPU, float32)."""
    out: Logits = {}
    step_no = 0

    def step(decode: list[str], items: list[PrefillItem] | None = None) -> None:
        nonlocal step_no
        step_no += 1
        tokens = {rid: (31 * step_no + 7 * len(rid) + ord(rid[0])) % runner.vocab_size for rid in decode}
        ids, logits = runner.step(tokens, items or [])
        for rid, row in zip(ids, logits.cpu(), strict=True):
            out.setdefault(rid, []).append(row)

    def item(rid: str, length: int, prefix_len: int | None) -> PrefillItem:
        prefix = None if prefix_len is None else artifacts[prefix_len]
        key = None if prefix is None else ("default", f"task-{prefix_len}", 1)
        return PrefillItem(rid, [(100 + 3 * i + ord(rid)) % 1000 for i in range(length)], prefix, key)

    running = ["a", "b", "c"]
    step([], [item("a", 5, 5), item("b", 3, None), item("c", 9, 200)])
    for _ in range(3):  # 3 rows: bucket 4
        step(running)
    step(running, [item("d", 2, 1), item("e", 4, 5)])  # joins beside decoding rows: the eager step
    running += ["d", "e"]
    for _ in range(4):  # 5 rows: bucket 8
        step(running)
    runner.release(["b"])
    running.remove("b")
    for _ in range(2):  # 4 rows: bucket 4
        step(running)
    runner.release(["a", "c"])  # task-200's last row leaves
    running = ["d", "e"]
    for _ in range(3):
        step(running)
    step([], [item("f", 20, 200)])  # task-200 comes back
    running.append("f")
    for _ in range(14):  # rows grow past several width buckets
        step(running)
    return out


def pool_contents(runner: GPT2Runner) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each row's own keys/values as stored in the pool: [layers, H, length, D] each."""
    cache = runner.cache
    contents = {}
    for rid, row in cache.rows.items():
        slots = torch.tensor(cache.slots(rid, row.length), device=cache.keys.device)
        contents[rid] = (cache.keys[:, :, slots].cpu(), cache.values[:, :, slots].cpu())
    return contents

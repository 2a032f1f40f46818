"""A BART scenario for comparing runs step by step: mixed tasks (three prefix kinds, a cross-only task,
no prefix), a task whose version changes while its old version's rows still decode, and rows joining
beside decoding rows. Greedy: each row feeds back its own argmax.

Used by the CPU tests (against the reference forward) and the GPU tests (CUDA against CPU, bf16 against
fp32); `device` and `dtype` are parameters, so both run the same code.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from modeling.model_spec import ModelSpec
from prefix_store.artifact import PrefixArtifact, new_artifact
from server.engine.bart_runner import BartRunner
from server.engine.runner import PrefillItem

# (encoder, decoder, cross) prefix lengths per (task, version); 0 = the artifact lacks that kind
VERSIONS: dict[tuple[str, int], tuple[int, int, int]] = {
    ("t1", 1): (5, 3, 4),
    ("t1", 2): (2, 6, 3),  # a new version may change lengths too
    ("t2", 1): (10, 10, 10),
    ("t3", 1): (0, 0, 6),
}


@dataclass
class Req:
    prompt: list[int]
    version: tuple[str, int] | None  # (task, version); None: the bare model
    max_new: int


# request id -> request; joining at the step of `JOINS`
REQUESTS = {
    "r0": Req([(37 * i + 11) % 1000 for i in range(7)], ("t1", 1), 9),
    "r1": Req([(53 * i + 5) % 1000 for i in range(3)], ("t2", 1), 6),
    "r2": Req([(71 * i + 2) % 1000 for i in range(12)], None, 4),
    "r3": Req([(29 * i + 7) % 1000 for i in range(5)], ("t1", 2), 6),  # t1's new version, r0 decoding
    "r4": Req([(13 * i + 3) % 1000 for i in range(9)], ("t3", 1), 5),
    "r5": Req([(19 * i + 1) % 1000 for i in range(4)], ("t1", 1), 3),  # the old version, still held
}
JOINS = {0: ["r0", "r1", "r2"], 2: ["r3", "r4"], 4: ["r5"]}


def scenario_artifacts(
    spec: ModelSpec, device: torch.device | str, dtype: torch.dtype
) -> dict[tuple[str, int], PrefixArtifact]:
    """The prefixes of `VERSIONS` (the same values whatever the device), on `device` in `dtype`."""
    out = {}
    for seed, (version, lengths) in enumerate(VERSIONS.items()):
        gen, prefixes = torch.Generator().manual_seed(100 + seed), {}
        for kind, length in zip(("encoder", "decoder", "cross"), lengths, strict=True):
            if length:
                layers, heads, head_dim = spec.layout(kind)
                prefixes[kind] = torch.randn(layers, 2, heads, length, head_dim, generator=gen) * 2
        out[version] = new_artifact(prefixes, spec, task=version[0]).to(device, dtype)
    return out


@dataclass
class Run:
    tokens: dict[str, list[int]]  # request id -> greedy tokens
    logits: dict[str, list[torch.Tensor]]  # request id -> logits [V] of each token (CPU, float32)
    held: list[set[Hashable]]  # decoder prefix keys the runner held after each step
    stats: list[dict[str, int]]  # the runner's `kv_stats()` after each step


def run_bart_scenario(runner: BartRunner, artifacts: dict[tuple[str, int], PrefixArtifact]) -> Run:
    run = Run({}, {}, [], [])
    for step in range(100):
        items = [_item(rid, artifacts) for rid in JOINS.get(step, [])]
        decoding = {rid: run.tokens[rid][-1] for rid in runner.request_ids}
        if not (decoding or items):
            if step > max(JOINS):
                return run
            continue
        ids, logits = runner.step(decoding, items)
        for rid, row in zip(ids, logits.float().cpu(), strict=True):
            run.logits.setdefault(rid, []).append(row)
            run.tokens.setdefault(rid, []).append(int(row.argmax()))
        run.held.append(set(runner.cache.prefixes.keys))
        run.stats.append(runner.kv_stats())
        runner.cache.check_invariants()
        runner.cross.check_invariants()
        runner.release([rid for rid in runner.request_ids if len(run.tokens[rid]) >= REQUESTS[rid].max_new])
    raise AssertionError("the scenario did not finish")


def _item(rid: str, artifacts: dict[tuple[str, int], PrefixArtifact]) -> PrefillItem:
    req = REQUESTS[rid]
    # the engine's key names the version: rows of one (task, version) share its prefixes
    return PrefillItem(rid, req.prompt, None if req.version is None else artifacts[req.version], req.version)

"""BART with prefixes: the functional reference against HF/PEFT, and the engine runner against the reference.

CPU, float32, a tiny random BART (init_std 0.2 so greedy output depends on the input and the prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling import bart_prefix
from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import PrefixArtifact, new_artifact
from prefix_store.peft_format import peft_to_artifact
from server.engine.bart_runner import BartRunner
from server.engine.errors import PromptTooLong
from server.engine.runner import PrefillItem
from tests.engine.bart_scenario import REQUESTS, run_bart_scenario, scenario_artifacts

# Task prefix lengths per kind (encoder, decoder, cross); 0 = the artifact lacks that kind.
TASK_LENGTHS = {
    "a": (5, 3, 4),
    "b": (10, 10, 10),
    "c": (1, 7, 2),
    "dec-only": (0, 4, 0),
    "cross-only": (0, 0, 6),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_model_dir("tiny-bart", tmp_path_factory.mktemp("bart") / "model", init_std=0.2)
    return load_model(str(path), device="cpu")


def _artifact(loaded: LoadedModel, lengths: tuple[int, int, int], seed: int) -> PrefixArtifact:
    spec, gen = loaded.spec, torch.Generator().manual_seed(seed)
    prefixes = {}
    for kind, length in zip(("encoder", "decoder", "cross"), lengths, strict=True):
        if length:
            layers, heads, head_dim = spec.layout(kind)
            prefixes[kind] = torch.randn(layers, 2, heads, length, head_dim, generator=gen) * 2
    return new_artifact(prefixes, spec, task=f"task-{seed}")


@pytest.fixture(scope="module")
def tasks(loaded: LoadedModel) -> dict[str, PrefixArtifact | None]:
    arts: dict[str, PrefixArtifact | None] = {
        name: _artifact(loaded, lengths, seed) for seed, (name, lengths) in enumerate(TASK_LENGTHS.items())
    }
    arts["none"] = None
    return arts


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 50000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the reference against HF ---------------------------------------------------------------------
def test_no_prefix_logits_match_hf_with_padding(loaded: LoadedModel) -> None:
    model, config = loaded.model, loaded.model.config
    sources = [bart_prefix.wrap_source(_prompt(1, 9), config), bart_prefix.wrap_source(_prompt(2, 4), config)]
    width = max(map(len, sources))
    input_ids = torch.tensor([s + [config.pad_token_id] * (width - len(s)) for s in sources])  # [2, S]
    mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in sources])[:, None]).long()  # [2, S]
    target = torch.tensor(
        [[config.decoder_start_token_id, 5, 6, 7], [config.decoder_start_token_id, 8, 9, 10]]
    )
    with torch.no_grad():
        expected = model(
            input_ids=input_ids, attention_mask=mask, decoder_input_ids=target
        ).logits  # [2, T, V]
        enc = bart_prefix.encode(model, input_ids, mask)  # [2, S, d]
        got = bart_prefix.decode(model, target, enc, mask)  # [2, T, V]
    assert (got - expected).abs().max().item() < 1e-5


def test_no_prefix_greedy_matches_hf_generate(loaded: LoadedModel) -> None:
    model = loaded.model
    outputs = set()
    for seed in (3, 4):
        source = bart_prefix.wrap_source(_prompt(seed, 8), model.config)
        with torch.no_grad():
            hf = model.generate(
                input_ids=torch.tensor([source]), max_new_tokens=10, do_sample=False, num_beams=1
            )
        ours = bart_prefix.greedy_generate(model, source, None, 10)
        assert ours == hf[0, 1:].tolist()
        outputs.add(tuple(ours))
    assert len(outputs) == 2, "different sources should give different outputs, or the check is weak"


def test_prefixes_are_differentiable(loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None]) -> None:
    """The trainer trains through `encode`/`decode`: every prefix kind must receive a gradient."""
    art = tasks["a"]
    assert art is not None
    prefixes = {k: v.clone().requires_grad_(True) for k, v in art.prefixes.items()}
    source = torch.tensor([bart_prefix.wrap_source(_prompt(5, 6), loaded.model.config)] * 2)  # [2, S]
    target = torch.tensor([[loaded.model.config.decoder_start_token_id, 11, 12]] * 2)  # [2, T]
    enc = bart_prefix.encode(loaded.model, source, None, prefixes["encoder"])
    logits = bart_prefix.decode(loaded.model, target, enc, None, prefixes["decoder"], prefixes["cross"])
    logits.logsumexp(-1).sum().backward()
    for kind, tensor in prefixes.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, kind


# ---- the runner against the reference -----------------------------------------------------------
def _run(
    runner: BartRunner, schedule: dict[int, list[tuple[str, list[int], PrefixArtifact | None, int]]]
) -> dict[str, list[int]]:
    """Greedy-drive the runner: requests join at their step, leave when they have max_new tokens."""
    out: dict[str, list[int]] = {}
    budget: dict[str, int] = {}
    for step in range(1000):
        joining = schedule.get(step, [])
        if joining:
            logits = runner.prefill([PrefillItem(rid, ids, art) for rid, ids, art, _ in joining])
            for (rid, _, _, max_new), row_logits in zip(joining, logits, strict=True):
                out[rid], budget[rid] = [int(row_logits.argmax())], max_new
        runner.release([rid for rid in runner.request_ids if len(out[rid]) >= budget[rid]])
        runner.cache.check_invariants()
        runner.cross.check_invariants()
        assert list(runner.cross.rows) == list(runner.cache.rows)
        if not runner.request_ids:
            if step > max(schedule):
                return out
            continue
        logits = runner.decode(torch.tensor([out[rid][-1] for rid in runner.request_ids]))
        for rid, row_logits in zip(runner.request_ids, logits, strict=True):
            out[rid].append(int(row_logits.argmax()))
    raise AssertionError("requests did not finish")


def test_runner_mixed_tasks_joining_and_leaving_match_reference(
    loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None]
) -> None:
    # (request id, task, prompt length, max_new_tokens), joining at staggered steps.
    plan = {
        0: [("r0", "a", 7, 6), ("r1", "b", 3, 9), ("r2", "none", 12, 3)],
        2: [("r3", "c", 5, 8)],
        4: [("r4", "dec-only", 9, 4), ("r5", "cross-only", 2, 7), ("r6", "a", 11, 5)],
        7: [("r7", "b", 6, 6), ("r8", "none", 4, 2)],
    }
    schedule = {
        step: [(rid, _prompt(i, n), tasks[task], max_new) for i, (rid, task, n, max_new) in enumerate(reqs)]
        for step, reqs in plan.items()
    }
    got = _run(BartRunner(loaded, max_rows=8, block_size=4), schedule)

    for reqs in schedule.values():
        for rid, ids, art, max_new in reqs:
            source = bart_prefix.wrap_source(ids, loaded.model.config)
            prefixes = None if art is None else art.prefixes
            expected = bart_prefix.greedy_generate(loaded.model, source, prefixes, max_new, eos_token_id=None)
            assert got[rid] == expected, rid
    # The prefixes matter: the same prompt under different tasks gives different outputs.
    ids = _prompt(0, 7)
    source = bart_prefix.wrap_source(ids, loaded.model.config)
    by_task = {
        name: tuple(bart_prefix.greedy_generate(loaded.model, source, a and a.prefixes, 6, eos_token_id=None))
        for name, a in tasks.items()
    }
    assert len(set(by_task.values())) == len(by_task)


def test_runner_with_peft_imported_prefix_matches_peft_generate(loaded: LoadedModel, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = load_model(loaded.name, device="cpu").model
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    weight = model.prompt_encoder["default"].embedding.weight  # [L, layers * 2 * d_model]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)) * 3)
    model.save_pretrained(str(tmp_path))
    model.eval()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-bart"  # fixed: see test_peft_seq2seq's header-size note
    artifact = peft_to_artifact(
        json.dumps(config).encode(), (tmp_path / "adapter_model.safetensors").read_bytes(), loaded.spec
    )

    prompts = {"p0": _prompt(20, 6), "p1": _prompt(21, 10)}
    schedule = {
        0: [("p0", prompts["p0"], artifact, 8), ("bare", prompts["p0"], None, 8)],
        1: [("p1", prompts["p1"], artifact, 5)],
    }
    got = _run(BartRunner(loaded, max_rows=4, block_size=4), schedule)
    for rid in ("p0", "p1"):
        source = bart_prefix.wrap_source(prompts[rid], loaded.model.config)
        with torch.no_grad():
            # The prefix passed explicitly, as the PEFT baselines do (loadtest/runners/peft_runners.py).
            peft_out = model.generate(
                input_ids=torch.tensor([source]),
                max_new_tokens=len(got[rid]),
                do_sample=False,
                num_beams=1,
                past_key_values=model.get_prompt(1),
            )
        assert got[rid] == peft_out[0, 1:].tolist(), rid
    assert got["p0"] != got["bare"]


def test_runner_length_rules(loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None]) -> None:
    runner = BartRunner(loaded, max_rows=2)
    limit = runner.max_positions  # 512
    art = tasks["b"]  # decoder prefix 10, cross prefix 10, encoder prefix 10
    runner.validate_lengths(
        limit - 2, limit - 10, art
    )  # source + bos/eos fills the encoder; Ld + G fills the decoder
    with pytest.raises(PromptTooLong, match="encoder needs 513 positions"):
        runner.validate_lengths(limit - 1, 1, art)
    with pytest.raises(PromptTooLong, match="decoder prefix length 10 \\+ max_new_tokens 503"):
        runner.validate_lengths(5, limit - 9, art)
    # The encoder prefix takes no position: a full-length source still fits with it.
    runner.validate_lengths(limit - 2, 1, tasks["a"])
    # own tokens only, in 16-token blocks: 20 decoder tokens -> 32, 5 + 2 encoder tokens -> 16
    assert runner.reserved_tokens(5, 20, art) == 32 + 16
    assert runner.prefix_positions(art) == 10 and runner.prefix_positions(None) == 0


def test_runner_serves_the_longest_allowed_request(tmp_path: Path) -> None:
    """A request at both limits runs to completion and matches the reference (64 positions, to stay fast)."""
    small = load_model(
        str(make_model_dir("tiny-bart", tmp_path, init_std=0.2, max_position_embeddings=64)), "cpu"
    )
    runner = BartRunner(small, max_rows=2, block_size=16)
    art = _artifact(small, (3, 7, 5), seed=9)
    limit = runner.max_positions
    max_new = limit - 7  # decoder prefix 7 + max_new_tokens == max_positions
    ids = _prompt(30, limit - 2)  # bos + source + eos == max_positions
    runner.validate_lengths(len(ids), max_new, art)
    got = _run(runner, {0: [("long", ids, art, max_new)]})
    source = bart_prefix.wrap_source(ids, small.model.config)
    assert got["long"] == bart_prefix.greedy_generate(
        small.model, source, art.prefixes, max_new, eos_token_id=None
    )


# ---- through the real Engine --------------------------------------------------------------------
async def test_engine_serves_mixed_bart_tasks_like_the_reference(
    loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None], tmp_path: Path
) -> None:
    """Concurrent requests for different tasks (and none) through `Engine`: each equals its lone reference."""
    import asyncio

    from prefix_store.artifact import dump_artifact
    from prefix_store.local_store import LocalPrefixStore
    from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from server.limits import Limits

    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    for name, art in tasks.items():
        if art is not None:
            await store.put("default", name, dump_artifact(art), {})
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=4)))
    await engine.start()
    plan = [("a", 7, 6), ("b", 3, 9), ("none", 12, 4), ("c", 5, 8), ("dec-only", 9, 5), ("cross-only", 2, 7)]
    try:

        async def run(i: int, task: str, n: int, max_new: int) -> list[int]:
            await asyncio.sleep(0.01 * i)  # staggered arrivals; max_batch_size 4 makes some wait
            request = GenerationRequest(
                request_id=f"q{i}",
                prompt=_prompt(40 + i, n),
                params=SamplingParams(max_new_tokens=max_new),
                task=None if task == "none" else task,
            )
            return [event.token_id async for event in engine.generate(request)]

        results = await asyncio.gather(*(run(i, *spec) for i, spec in enumerate(plan)))
    finally:
        await engine.stop(drain_timeout_s=0)
        await store.close()
    for i, ((task, n, max_new), got) in enumerate(zip(plan, results, strict=True)):
        art = tasks[task]
        source = bart_prefix.wrap_source(_prompt(40 + i, n), loaded.model.config)
        expected = bart_prefix.greedy_generate(loaded.model, source, art and art.prefixes, max_new)
        assert got == expected, task


# ---- shared prefixes, versions, memory ------------------------------------------------------------
@pytest.mark.parametrize("keep_cross_gathers", [True, False])  # CPU's default; CUDA's
def test_runner_mixed_tasks_version_change_and_joins_match_reference(
    loaded: LoadedModel, keep_cross_gathers: bool
) -> None:
    """Tasks t1 v1 and v2 (both held while v1's rows decode), a cross-only task and the bare model,
    rows joining beside decoding rows: every row's greedy tokens equal its lone reference, and its
    logits the reference's (teacher-forced on those tokens) within 1e-4."""
    artifacts = scenario_artifacts(loaded.spec, "cpu", torch.float32)
    runner = BartRunner(loaded, max_rows=8, block_size=4, keep_cross_gathers=keep_cross_gathers)
    run = run_bart_scenario(runner, artifacts)
    assert any(s["cross_gather_bytes"] for s in run.stats) == keep_cross_gathers
    assert any({("t1", 1), ("t1", 2)} <= held for held in run.held), "the two versions never coexisted"
    model = loaded.model
    for rid, req in REQUESTS.items():
        prefixes = None if req.version is None else artifacts[req.version].prefixes
        source = bart_prefix.wrap_source(req.prompt, model.config)
        expected = bart_prefix.greedy_generate(model, source, prefixes, req.max_new, eos_token_id=None)
        assert run.tokens[rid] == expected, rid
        prefixes = prefixes or {}
        target = torch.tensor([[model.config.decoder_start_token_id, *expected[:-1]]])  # [1, T]
        with torch.no_grad():
            enc = bart_prefix.encode(model, torch.tensor([source]), None, prefixes.get("encoder"))
            want = bart_prefix.decode(
                model, target, enc, None, prefixes.get("decoder"), prefixes.get("cross")
            )
        got = torch.stack(run.logits[rid])  # [T, V]
        assert (got - want[0]).abs().max().item() < 1e-4, rid
    # the versions differ: the same prompt gives different outputs under each
    source = bart_prefix.wrap_source(REQUESTS["r0"].prompt, model.config)
    v1, v2 = (
        bart_prefix.greedy_generate(model, source, artifacts[("t1", v)].prefixes, 6, eos_token_id=None)
        for v in (1, 2)
    )
    assert v1 != v2


def test_prefix_memory_grows_with_distinct_task_versions_not_with_rows(
    loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None]
) -> None:
    art = tasks["b"]
    assert art is not None
    runner = BartRunner(loaded, max_rows=32, block_size=4)
    one = art.prefixes["decoder"].nbytes + art.prefixes["cross"].nbytes  # the encoder's is not kept
    runner.prefill([PrefillItem(f"x{i}", [1, 2, 3], art, ("b", 1)) for i in range(8)])
    stats = runner.kv_stats()
    assert stats["prefix_bytes"] == one  # 8 rows, one task: one copy
    runner.prefill([PrefillItem(f"y{i}", [1, 2, 3], art, ("b", 1)) for i in range(16)])
    assert runner.kv_stats()["prefix_bytes"] == one  # 24 rows, still one copy
    assert runner.kv_stats()["used_bytes"] == 3 * stats["used_bytes"]  # own tokens follow the rows
    v2 = art.to("cpu", torch.float32)  # the same task's next version: its own copy
    runner.prefill([PrefillItem("z", [1, 2, 3], v2, ("b", 2))])
    assert runner.kv_stats()["prefix_bytes"] == 2 * one and runner.kv_stats()["prefix_entries"] == 4
    runner.release([f"x{i}" for i in range(8)] + [f"y{i}" for i in range(16)])
    assert runner.kv_stats()["prefix_bytes"] == one  # the old version went with its last row
    runner.release(["z"])
    assert runner.kv_stats()["prefix_bytes"] == runner.kv_stats()["used_bytes"] == 0
    runner.cache.check_invariants()
    runner.cross.check_invariants()


async def test_engine_encodes_waiting_requests_of_different_tasks_in_one_step(
    loaded: LoadedModel, tasks: dict[str, PrefixArtifact | None], tmp_path: Path
) -> None:
    """Requests that wait while a step runs are prefilled together: one step, one encoder pass over
    their prompts (different tasks, lengths and prefix kinds), and each equals its lone reference."""
    import asyncio
    import threading

    from prefix_store.artifact import dump_artifact
    from prefix_store.local_store import LocalPrefixStore
    from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from server.engine.handle import RequestHandle
    from server.limits import Limits

    class GatedRunner(BartRunner):
        """The real runner; its steps wait for `gate` and record the request ids they prefill."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.gate, self.waiting = threading.Event(), threading.Event()
            self.gate.set()
            self.prefilled: list[list[str]] = []

        def step(
            self, decode_tokens: dict[str, int], items: list[PrefillItem]
        ) -> tuple[list[str], torch.Tensor]:
            if not self.gate.is_set():
                self.waiting.set()
                self.gate.wait(timeout=60)
            if items:
                self.prefilled.append([it.request_id for it in items])
            return super().step(decode_tokens, items)

    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    for name, art in tasks.items():
        if art is not None:
            await store.put("default", name, dump_artifact(art), {})
    runner = GatedRunner(loaded, max_rows=8)
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=8)), runner=runner)
    await engine.start()
    plan = [("none", 6, 3), ("a", 7, 6), ("b", 3, 5), ("cross-only", 12, 4), ("dec-only", 5, 6)]

    def request(i: int, task: str, n: int, max_new: int) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"q{i}",
            prompt=_prompt(60 + i, n),
            params=SamplingParams(max_new_tokens=max_new),
            task=None if task == "none" else task,
        )

    async def tokens(handle: RequestHandle) -> list[int]:
        return [event.token_id async for event in handle]

    try:
        # warm-up: every task's prefix resident on the device, so none waits for a load below
        warm = [request(i, task, 2, 1) for i, (task, _, _) in enumerate(plan)]
        for r in warm:
            r.request_id = f"warm-{r.request_id}"
        for handle in [await engine.add_request(r) for r in warm]:
            await tokens(handle)
        runner.gate.clear()
        runner.prefilled.clear()
        first = await engine.add_request(request(0, *plan[0]))  # its prefill step waits at the gate
        while not runner.waiting.is_set():
            await asyncio.sleep(0.01)
        handles = [await engine.add_request(request(i, *spec)) for i, spec in enumerate(plan) if i]
        runner.gate.set()
        results = [await tokens(h) for h in (first, *handles)]
    finally:
        runner.gate.set()
        await engine.stop(drain_timeout_s=0)
        await store.close()
    assert runner.prefilled == [["q0"], ["q1", "q2", "q3", "q4"]]
    for i, ((task, n, max_new), got) in enumerate(zip(plan, results, strict=True)):
        art = tasks[task]
        source = bart_prefix.wrap_source(_prompt(60 + i, n), loaded.model.config)
        assert got == bart_prefix.greedy_generate(loaded.model, source, art and art.prefixes, max_new), task

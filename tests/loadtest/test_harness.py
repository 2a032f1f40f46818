"""The benchmark harness: workloads are reproducible and shaped as asked, the metric math is right,
the PEFT baselines compute what the engine computes, and a tiny end-to-end run writes every output."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch

from loadtest import bench
from loadtest.metrics import SLO, RequestRecord, RunResult, percentile, summarize
from loadtest.workload import ClientPool, WorkloadSpec, make_workload, task_weights

VOCAB, EOS = 1000, 999


def test_same_spec_gives_identical_requests_and_another_seed_does_not() -> None:
    spec = WorkloadSpec(num_requests=20, num_tasks=4, prompt_len=(5, 9), output_len=(2, 4), request_rate=5.0)
    a, b = make_workload(spec, VOCAB, EOS), make_workload(spec, VOCAB, EOS)
    assert a.requests == b.requests
    other = make_workload(WorkloadSpec(**{**spec.to_dict(), "seed": 1}), VOCAB, EOS)
    assert [r.prompt_ids for r in other.requests] != [r.prompt_ids for r in a.requests]


def test_prompts_and_outputs_stay_in_range_and_never_contain_eos() -> None:
    spec = WorkloadSpec(num_requests=300, num_tasks=3, prompt_len=(3, 6), output_len=(7, 9))
    w = make_workload(spec, 10, eos_token_id=9)  # a tiny vocabulary makes EOS likely if not excluded
    assert all(3 <= len(r.prompt_ids) <= 6 and 9 not in r.prompt_ids for r in w.requests)
    assert {r.max_new_tokens for r in w.requests} == {7, 8, 9}
    assert all(r.arrival_s == 0.0 for r in w.requests)  # closed loop: no precomputed arrivals


def test_zipf_popularity_is_skewed_as_its_weights_say() -> None:
    spec = WorkloadSpec(
        num_requests=6000,
        num_tasks=8,
        prompt_len=(1, 1),
        output_len=(1, 1),
        task_popularity="zipf",
        zipf_s=1.1,
    )
    counts = Counter(r.task for r in make_workload(spec, VOCAB, EOS).requests)
    weights = task_weights(8, "zipf", 1.1)
    assert counts["task-000"] > 4 * counts["task-007"]
    for k, w in enumerate(weights):
        assert abs(counts[f"task-{k:03d}"] / 6000 - w) < 0.02


def test_poisson_arrivals_have_the_requested_mean_gap() -> None:
    spec = WorkloadSpec(
        num_requests=5000, num_tasks=1, prompt_len=(1, 1), output_len=(1, 1), request_rate=10.0
    )
    arrivals = [r.arrival_s for r in make_workload(spec, VOCAB, EOS).requests]
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.1)  # exponential: stdev == mean


def test_client_pool_closed_loop_releases_a_request_when_a_client_frees() -> None:
    w = make_workload(
        WorkloadSpec(num_requests=4, num_tasks=1, prompt_len=(1, 1), output_len=(1, 1), concurrency=2),
        VOCAB,
        EOS,
    )
    pool = ClientPool(w)
    assert [r.index for r in pool.arrived(0.0)] == [0, 1]
    assert pool.next_arrival() is None  # both clients busy
    pool.finish(1.5)
    assert pool.arrived(1.0) == [] and pool.next_arrival() == 1.5
    assert [r.index for r in pool.arrived(1.5)] == [2]
    assert pool.arrival_s["req-00002"] == 1.5


def _record(rid: str, arrival: float, times: list[float], requested: int | None = None) -> RequestRecord:
    return RequestRecord(rid, "t", arrival, times, times[-1], 4, requested or len(times))


def test_metrics_from_hand_made_records() -> None:
    records = [
        _record("a", 0.0, [1.0, 1.5, 2.0]),  # TTFT 1.0, TPOT 0.5, e2e 2.0
        _record("b", 1.0, [4.0, 4.1, 4.2, 4.3, 4.4]),  # TTFT 3.0, TPOT 0.1, e2e 3.4
        _record("c", 0.0, [0.5], requested=3),  # one token: no TPOT; stopped short
    ]
    s = summarize(RunResult("x", records, wall_s=5.0, peak_rss_bytes=123), SLO(ttft_s=2.0, tpot_s=0.4))
    assert s["output_tokens"] == 9 and s["output_tok_s"] == pytest.approx(9 / 5)
    assert s["requests_s"] == pytest.approx(3 / 5)
    assert s["ttft_p50_s"] == pytest.approx(1.0)
    assert s["tpot_p50_s"] == pytest.approx(0.3)  # median of 0.5 and 0.1
    assert s["itl_p50_s"] == pytest.approx(0.1)  # gaps: 0.5, 0.5, 0.1 x4
    assert s["e2e_p90_s"] == pytest.approx(percentile([2.0, 3.4, 0.5], 90))
    # "a" misses TPOT, "b" misses TTFT, "c" meets both (no TPOT with one token).
    assert s["goodput_req_s"] == pytest.approx(1 / 5)
    assert s["num_short_outputs"] == 1 and s["peak_rss_bytes"] == 123


def test_percentile_interpolates_linearly() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([], 50) is None


def test_failed_request_counts_as_error_not_throughput() -> None:
    bad = RequestRecord("z", "t", 0.0, [], 1.0, 4, 3, error="boom")
    s = summarize(RunResult("x", [_record("a", 0.0, [1.0, 2.0]), bad], wall_s=2.0), SLO())
    assert s["num_errors"] == 1 and s["num_completed"] == 1 and s["output_tokens"] == 2


def test_peft_baseline_generates_the_engines_tokens(tmp_path: Path) -> None:
    """The PEFT runners (with the prefix passed to `generate` explicitly) and the engine compute one function."""
    from loadtest.prefixes import make_task_prefixes
    from loadtest.runners.engine_runner import TENANT, exact_length_params
    from loadtest.runners.peft_runners import PeftBaseline
    from modeling.models import load_model, make_model_dir
    from prefix_store.local_store import LocalPrefixStore
    from server.engine import Engine, EngineConfig, GenerationRequest
    from server.limits import Limits

    # init_std 0.2: a random model whose greedy output depends on its input and prefix.
    loaded = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "m", init_std=0.2)), device="cpu")
    prefixes = make_task_prefixes(loaded, ["a", "b"], {"a": 3, "b": 5}, tmp_path / "peft")
    prompts = {"a": [5, 6, 7, 8], "b": [11, 12]}
    baseline = PeftBaseline(loaded, prefixes.peft_dirs)
    expected = {t: baseline.generate(t, [p], 6, None)[0].tolist() for t, p in prompts.items()}
    batched = baseline.generate("a", [prompts["a"], [1, 2, 3, 4]], 6, None)[0].tolist()
    baseline.unload()

    async def engine_tokens() -> dict[str, list[int]]:
        store = LocalPrefixStore(tmp_path / "store")
        for task, data in prefixes.artifacts.items():
            await store.put(TENANT, task, data, {})
        engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=4)))
        await engine.start()
        try:
            out = {}
            for task, prompt in prompts.items():
                req = GenerationRequest(f"r-{task}", prompt, exact_length_params(6), TENANT, task)
                out[task] = [e.token_id async for e in engine.generate(req) if e.token_id is not None]
            return out
        finally:
            await engine.stop()

    got = asyncio.run(engine_tokens())
    assert got == expected
    assert batched == expected["a"]  # left padding in a static batch does not change a row's output
    assert expected["a"] != expected["b"]


def test_tiny_end_to_end_run_writes_json_table_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = bench.Profile(
        name="tiny",
        device="cpu",
        dtype="float32",
        main=bench.Section(
            preset="tiny-gpt2",
            workload=WorkloadSpec(
                num_requests=4, num_tasks=2, prompt_len=(4, 8), output_len=(3, 5), concurrency=4
            ),
            runners=("engine", "no_prefix", "naive_peft", "static_batch"),
            max_batch_size=4,
            scaling=(1, 4),
            scaling_min_requests=2,
        ),
    )
    monkeypatch.setitem(bench.PROFILES, "tiny", tiny)
    out = tmp_path / "out"
    argv = ["--profile", "tiny", "--out", str(out), "--models-dir", str(tmp_path / "models")]
    assert bench.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    for key in ("workload", "machine", "command", "results", "ratios", "scaling", "flops"):
        assert key in doc
    assert {"cpu", "cores", "torch", "device"} <= set(doc["machine"])
    assert set(doc["results"]) == {"engine", "no_prefix", "naive_peft", "static_batch"}
    per_runner = {
        "output_tok_s", "requests_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "itl_p50_s",
        "itl_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "goodput_req_s", "peak_rss_bytes",
    }  # fmt: skip
    for name, res in doc["results"].items():
        assert per_runner <= set(res), name
        assert res["num_completed"] == 4 and res["output_tok_s"] > 0 and res["peak_rss_bytes"] > 0
    assert doc["results"]["naive_peft"]["output_tokens"] == doc["workload"]["total_output_tokens"]
    assert {"engine_vs_naive", "engine_vs_static", "engine_vs_no_prefix"} <= set(doc["ratios"])
    assert [p["concurrency"] for p in doc["scaling"]] == [1, 4]
    assert all(p["output_tok_s"] > 0 for p in doc["scaling"])
    assert "| engine |" in (out / "report.md").read_text()
    for png in ("throughput_vs_concurrency.png", "latency_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_model_flops_count_matmuls_of_useful_tokens() -> None:
    from transformers import AutoModelForCausalLM

    from loadtest.machine import gpt2_flops
    from modeling.models import build_config

    model = AutoModelForCausalLM.from_config(build_config("tiny-gpt2"))
    d, layers, vocab = 64, 2, model.config.vocab_size
    block = 12 * d * d * layers  # c_attn 3d², c_proj d², mlp 8d² per layer
    # One request: 3 prompt tokens, 1 output token -> 3 fed tokens, 1 logits row, no prefix.
    expected = 2 * block * 3 + 2 * vocab * d * 1 + 4 * d * layers * (1 + 2 + 3)
    assert gpt2_flops(model, [3], [1], [0]) == pytest.approx(expected)
    assert torch.is_grad_enabled()  # nothing above leaks inference mode

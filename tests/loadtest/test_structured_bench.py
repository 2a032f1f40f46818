"""The structured-output benchmark (`prefixserve bench --profile structured`): its runners, its ratios,
and one real server run with a JSON schema on every other request."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import bench, report
from loadtest.metrics import SLO, summarize
from loadtest.prefixes import make_task_prefixes
from loadtest.runners.http_runner import run_http
from loadtest.structured_load import SCHEMA_FIELDS, schema_on_every_other
from loadtest.workload import WorkloadSpec, make_workload
from modeling.models import load_model, make_model_dir


def test_the_profile_compares_half_constrained_with_free_on_both_backends() -> None:
    section = bench.PROFILES["structured"].main
    assert section.workload.num_requests == 64 and section.workload.concurrency == 64
    assert set(section.runners) == {"server_native", "server_native_json", "server_vllm", "server_vllm_json"}
    assert {bench.SERVER_BACKENDS[r] for r in section.runners} == {"native", "vllm"}
    ratio = report.ratios(
        {
            "server_native": {"output_tok_s": 100.0},
            "server_native_json": {"output_tok_s": 90.0},
            "server_vllm": {"output_tok_s": 200.0},
            "server_vllm_json": {"output_tok_s": None},  # failed: reported as not measured
        }
    )
    assert ratio["server_native_json_vs_server_native"] == pytest.approx(0.9)
    assert ratio["server_vllm_json_vs_server_vllm"] is None
    assert "server_native_json_vs_server_native" not in report.ratios({"engine": {"output_tok_s": 5.0}})


def test_half_the_burst_carries_a_schema_and_every_request_still_generates_max_tokens(tmp_path: Path) -> None:
    """A real server: the schema requests are accepted (no `ignore_eos` with them) and, like the free
    ones, generate exactly `max_new_tokens` (the schema cannot end sooner), so tokens/s compare."""
    model_dir = make_model_dir("tiny-gpt2", tmp_path / "m", seed=0)
    loaded = load_model(str(model_dir), "cpu", "float32")
    spec = WorkloadSpec(num_requests=6, num_tasks=3, prompt_len=(4, 8), output_len=(20, 30), concurrency=6)
    workload = make_workload(spec, loaded.spec.vocab_size, loaded.model.config.eos_token_id)
    assert [bool(schema_on_every_other(r)) for r in workload.requests] == [True, False] * 3
    prefixes = make_task_prefixes(
        loaded, workload.tasks, {t: 4 for t in workload.tasks}, tmp_path / "p", with_peft=False
    )
    log = tmp_path / "server.log"
    run = run_http(
        str(model_dir), workload, prefixes.artifacts, 8, "cpu", "float32", log, "server_native_json",
        {"engine": "native", "log_level": "INFO"}, fields=schema_on_every_other, warm_fields=SCHEMA_FIELDS,
    )  # fmt: skip
    assert log.read_text().count("compiled a json constraint") == 1  # at warm-up; then cached
    assert [r.error for r in run.records] == [None] * 6
    assert [len(r.token_times) for r in run.records] == [r.max_new_tokens for r in workload.requests]
    assert {r.finish_reason for r in run.records} == {"length"}
    assert summarize(run, SLO())["num_short_outputs"] == 0

"""The outside BART baselines (CTranslate2 fp32/int8, HF generate) serve a workload: every request gets
exactly its requested tokens, in time order, in static batches no larger than asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loadtest import bench
from loadtest.runners.bart_baselines import BART_BASELINES, run_bart_baseline
from loadtest.workload import WorkloadSpec, make_workload
from modeling.models import load_model, make_model_dir


@pytest.mark.parametrize("name", BART_BASELINES)
def test_baseline_serves_exact_lengths_in_static_batches(name: str, tmp_path: Path) -> None:
    if name.startswith("ctranslate2") and importlib.util.find_spec("ctranslate2") is None:
        pytest.skip("ctranslate2 is not installed")
    model_dir = make_model_dir("tiny-bart", tmp_path / "tiny-bart", init_std=0.2)
    loaded = load_model(str(model_dir), "cpu", "float32")
    spec = WorkloadSpec(num_requests=5, num_tasks=2, prompt_len=(4, 9), output_len=(3, 6), concurrency=5)
    workload = make_workload(spec, 50257, loaded.model.config.eos_token_id)
    run = run_bart_baseline(name, loaded, model_dir, workload, max_batch_size=2)
    assert name in bench.ALL_RUNNERS
    assert run.runner == name and run.extra["num_batches"] == 3  # 5 requests, at most 2 per batch
    for record, request in zip(run.records, workload.requests, strict=True):
        assert record.ok and record.num_output_tokens == request.max_new_tokens, record
        assert record.token_times == sorted(record.token_times) and record.end == record.token_times[-1]

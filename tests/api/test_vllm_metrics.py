"""`/metrics` carries vLLM's counters and histograms (names, types, labels, bucket boundaries of vLLM's
`vllm/v1/metrics/loggers.py`), read with prometheus_client's own parser from a real server, and they
count exactly what a request did."""

from __future__ import annotations

import asyncio
import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ACME
from tests.api.test_clients import served  # noqa: F401  (the fixture, shared)

TTFT = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
PER_TOKEN = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]  # fmt: skip
REQUEST = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip
ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# vLLM's 1-2-5 length buckets up to max_model_len (the tiny model's 512 positions).
LENGTHS_512 = [1, 2, 5, 10, 20, 50, 100, 200, 500]

COUNTERS = ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions"]
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": PER_TOKEN,
    "vllm:time_per_output_token_seconds": PER_TOKEN,
    "vllm:e2e_request_latency_seconds": REQUEST,
    "vllm:request_queue_time_seconds": REQUEST,
    "vllm:request_prompt_tokens": LENGTHS_512,
    "vllm:request_generation_tokens": LENGTHS_512,
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    "vllm:iteration_tokens_total": ITERATION,
}


async def scrape(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        text = (await client.get("/metrics")).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels: str) -> float:
    matches = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (family, sample, labels, matches)
    return matches[0]


async def test_vllm_counters_and_histograms_count_a_request_exactly(served):  # noqa: F811
    api, url = served
    model_name = api.app.state.prefixserve.config.model_id
    ids = api.engine.tokenizer.encode("Roses are red, violets are blue")
    before = await scrape(url)

    # Types, labels and buckets, as vLLM exports them.
    for name in COUNTERS:
        assert before[name].type == "counter", name
    for name, buckets in HISTOGRAMS.items():
        assert before[name].type == "histogram", name
        bounds = [float(s.labels["le"]) for s in before[name].samples if s.name == f"{name}_bucket"]
        assert bounds == [*buckets, math.inf], name
        assert all(
            s.labels["model_name"] == model_name and s.labels["engine"] == "0" for s in before[name].samples
        )
    assert before["vllm:cache_config_info"].type == "gauge"
    (info,) = before["vllm:cache_config_info"].samples
    assert info.value == 1 and info.labels["block_size"] == str(api.settings.kv_block_size)
    reasons = {s.labels["finished_reason"] for s in before["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort"}

    async with httpx.AsyncClient(base_url=url, timeout=60, headers=ACME) as client:
        body = {"model": "poems", "prompt": ids, "max_tokens": 7, "ignore_eos": True, "stream": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        prefix_length = (await client.get("/v1/prefixes/poems")).json()["prefix_length"]
    await asyncio.sleep(0)
    after = await scrape(url)

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    prompt, generated = len(ids), 7
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == generated
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="stop") == 0
    assert delta("vllm:num_preemptions", "vllm:num_preemptions_total") == 0
    counts = {
        "vllm:time_to_first_token_seconds": 1,
        "vllm:inter_token_latency_seconds": generated - 1,
        "vllm:time_per_output_token_seconds": generated - 1,
        "vllm:e2e_request_latency_seconds": 1,
        "vllm:request_queue_time_seconds": 1,
        "vllm:request_prompt_tokens": 1,
        "vllm:request_generation_tokens": 1,
        "vllm:request_params_n": 1,
    }
    for name, count in counts.items():
        assert delta(name, f"{name}_count") == count, name
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == prompt
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == generated
    assert delta("vllm:request_params_n", "vllm:request_params_n_sum") == 1
    # Every token computed or generated went through some engine step; on the vLLM backend the task's
    # virtual prefix positions are computed positions too (as vLLM counts them; never in usage).
    computed = prompt + (prefix_length if api.engine.backend == "vllm" else 0)
    assert delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") == computed + generated
    # The request's prompt length lands in vLLM's bucket for it.
    le = str(float(next(b for b in LENGTHS_512 if b >= prompt)))
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_bucket", le=le) == 1

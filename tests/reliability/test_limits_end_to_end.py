"""Every configurable limit set to a non-default value reaches every layer of one real server process.

The regression this guards: the API validated uploads with the configured limits while the
engine loaded them with default ones, so with `PREFIXSERVE_MAX_PREFIX_LENGTH` above 512 an upload
succeeded and every generation for it failed. Now one `Limits` object is built from the settings and
handed to both. Batch size, queue bound and queue timeout are driven through a real server in
`test_faults.py::test_overload_queue_timeout_and_disconnect`; here they and the rest are non-default too.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from prefix_store.artifact import dump_artifact, new_artifact
from server.limits import Limits
from server.settings import Settings
from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, GLOBEX, TEST_ENGINE, generate, metric_value, upload

pytestmark = pytest.mark.timeout(300)

LONG_PREFIX = 600  # > 512, the default max_prefix_length
LIMITS = Limits(
    max_body_bytes=3 << 20,
    max_json_body_bytes=2 << 20,
    max_prompt_chars=200_000,
    max_prompts_per_request=5,
    timeout_keep_alive_s=30,
    timeout_request_header_s=60.0,
    max_connections=500,
    max_request_header_bytes=32768,
    shutdown_grace_s=7.0,
    max_artifact_bytes=800_000,  # fits a 600-long prefix of this model (~615 kB), not a 1000-long one
    max_prefix_length=1024,
    keep_versions=2,
    store_timeout_s=9.0,
    max_batch_size=3,
    max_waiting=17,
    tenant_max_waiting=2,
    queue_timeout_s=45.0,
    max_prefill_tokens=3000,
    kv_budget_tokens=3000,
    static_prefix_arena_tokens=1024,  # the static decode path is off on CPU: accepted, not exercised
    max_cuda_graphs=8,
    device_prefix_cache_bytes=4096,  # smaller than one long prefix: it is kept in the host tier only
    host_prefix_cache_bytes=64 << 20,
    tenant_max_concurrent=50,  # above max_batch_size + tenant_max_waiting: the engine's bound answers
    tenant_rps=500.0,
    tenant_upload_rps=500.0,
    tenant_max_tasks=50,
    tenant_max_stored_bytes=1 << 30,
    max_training_metadata_bytes=32 << 10,
    max_training_file_bytes=16 << 20,
    tenant_max_training_files=50,
    max_training_tokens_per_job=10_000_000,
    tenant_max_running_jobs=2,
    tenant_max_queued_jobs=5,
    timeout_request_body_s=45.0,
    min_request_body_bytes_per_s=4096,
    timeout_refused_body_s=2.0,
    tenant_max_connections=400,
    timeout_write_s=40.0,
    max_tokenize_chars=150_000,
    chat_template_workers=1,
    chat_template_timeout_s=3.0,
    chat_template_max_memory_bytes=192 << 20,
    grammar_workers=3,
    grammar_compile_timeout_s=1.5,
    grammar_compile_max_memory_bytes=384 << 20,
    grammar_cache_bytes=32 << 20,
    vllm_prefix_table_bytes=256 << 20,  # the vLLM pass serves the long prefix from this table
    vllm_max_queued=1,
    vllm_kv_cache_bytes=16 << 20,  # 16,384 tokens of this model: three rows of 3,900 and vLLM's spare
    vllm_max_model_len=3900,
    warm_start_tasks=8,
    warm_start_timeout_s=30.0,
)
# GPT-2's paged pool is sized by kv_budget_bytes when set, else by kv_budget_tokens' worth: this test
# sets the tokens form (whose refusal it checks), so the bytes form stays at its default (None).
TOKENS_FORM_OF_KV_BUDGET = {"kv_budget_bytes"}


def half_artifact(spec: Any, length: int) -> bytes:
    prefix = torch.ones(spec.num_layers, 2, spec.num_heads, length, spec.head_dim, dtype=torch.float16)
    return dump_artifact(new_artifact({"decoder": prefix}, spec))  # [layers, 2, H, L, D]


def burst_of_long_generations(url: str, num_requests: int) -> list[tuple[int, str]]:
    """(status, body) of `num_requests` concurrent generations long enough to still run while the
    last of them arrives (900 tokens on a tiny model: seconds; three rows fit the KV budget of 3000)."""

    def one(_: int) -> tuple[int, str]:
        with httpx.Client(base_url=url, timeout=300.0) as client:
            r = generate(client, None, max_new_tokens=900, ignore_eos=True)
            return r.status_code, r.text

    with ThreadPoolExecutor(num_requests) as pool:
        return list(pool.map(one, range(num_requests)))


def test_every_limit_is_non_default_here() -> None:
    defaults = Limits()
    same = [
        f.name
        for f in dataclasses.fields(Limits)
        if getattr(LIMITS, f.name) == getattr(defaults, f.name) and f.name not in TOKENS_FORM_OF_KV_BUDGET
    ]
    assert same == [], f"set these to non-default values in LIMITS: {same}"


def test_configured_limits_hold_from_upload_to_generation(
    spawn_server: Any, long_gpt2_dir: Path, long_spec: Any
):
    server = spawn_server(model_dir=long_gpt2_dir, **dataclasses.asdict(LIMITS))
    with server.client() as client:
        # The bug: a prefix longer than 512 is accepted on upload and then served, not failed.
        long_prefix = artifact_bytes(long_spec, seed=1, length=LONG_PREFIX)
        assert len(long_prefix) < LIMITS.max_artifact_bytes
        created = upload(client, "long", long_prefix)
        assert created.status_code == 201, created.text
        assert created.json()["prefix_lengths"] == {"decoder": LONG_PREFIX}
        answer = generate(client, "long", max_new_tokens=4, ignore_eos=True)
        assert answer.status_code == 200, answer.text
        assert answer.json()["generated_text"]

        # ... and beyond the configured prefix length it is refused on upload, naming the limit.
        # (float16, so that the file itself stays under max_artifact_bytes)
        too_long = upload(client, "too-long", half_artifact(long_spec, LIMITS.max_prefix_length + 1))
        assert too_long.status_code == 422 and str(LIMITS.max_prefix_length) in too_long.text, too_long.text

        # Artifact size: the configured limit, not the default 64 MiB.
        big = artifact_bytes(long_spec, seed=3, length=1000)
        assert LIMITS.max_artifact_bytes < len(big) < LIMITS.max_body_bytes
        refused = upload(client, "big", big)
        assert refused.status_code == 422 and str(LIMITS.max_artifact_bytes) in refused.text, refused.text

        # Request body: the configured limit (413 before the body is parsed).
        body = client.post("/v1/generate", content=b"x" * (LIMITS.max_body_bytes + 1), headers=ACME)
        assert body.status_code == 413, body.text

        # Prompts per completions request: a list of one more than configured is refused, naming both.
        prompts = ["x"] * (LIMITS.max_prompts_per_request + 1)
        listed = client.post("/v1/completions", json={"model": "long", "prompt": prompts}, headers=ACME)
        assert listed.status_code == 422 and f"{len(prompts)} prompts" in listed.text, listed.text
        assert f"at most {LIMITS.max_prompts_per_request}" in listed.text

        # Each backend's own machinery means nothing to the other: the operator is told at start, in
        # one warning, which of the settings given the backend in use ignores.
        log = server.log_path.read_text(errors="replace")
        backend = "vLLM" if TEST_ENGINE == "vllm" else "native"
        ignored = [line for line in log.splitlines() if f"engine: {backend} ignores" in line]
        assert len(ignored) == 1, server.log_tail(100)
        other = "native" if TEST_ENGINE == "vllm" else "vllm"
        named = set(ignored[0].split(" ignores ", 1)[1].split(" (", 1)[0].split(", "))
        for name, info in Settings.model_fields.items():
            given = dataclasses.asdict(LIMITS).get(name) is not None
            marked = (info.json_schema_extra or {}).get("engine") == other  # type: ignore[union-attr]
            assert (f"PREFIXSERVE_{name.upper()}" in named) == (given and marked), (name, ignored[0])
        if TEST_ENGINE == "vllm":
            # vLLM's sequences stop at the configured length, prefix included.
            too_long = generate(client, "long", max_new_tokens=LIMITS.vllm_max_model_len - LONG_PREFIX)
            assert too_long.status_code == 422, too_long.text
        else:
            # KV budget: a row's own tokens (prompt + max_new_tokens; the prefix is shared, stored once
            # per task) beyond 3000 (still within the model's 4096 with the prefix). The pool is whole
            # blocks, so the budget the error names is 3000 rounded down to a block.
            over_budget = generate(client, "long", max_new_tokens=LIMITS.kv_budget_tokens + 10)
            assert over_budget.status_code == 422, over_budget.text
            assert "more than the whole KV budget of" in over_budget.json()["error"]

        # Structured output: a compile is stopped at the configured deadline or memory cap (whichever it
        # meets first on this CPU; the refusal names its value), a small one passes.
        # 120,000 values (~1 MB of JSON): beyond 1.5 s or 384 MiB on any CPU here (30,000 compiled within
        # 1.5 s for vLLM, which needs no token masks, on a 2-core AMD EPYC).
        enum = {"enum": [f"v{k}" for k in range(120_000)]}
        body = {"model": "long", "prompt": "x", "max_tokens": 4}
        slow = client.post("/v1/completions", json={**body, "guided_json": enum}, headers=ACME)
        assert slow.status_code == 400, slow.text
        bounds = (
            f"did not compile within {LIMITS.grammar_compile_timeout_s:g} s",
            f"PREFIXSERVE_GRAMMAR_COMPILE_MAX_MEMORY_BYTES={LIMITS.grammar_compile_max_memory_bytes})",
        )
        assert any(bound in slow.text for bound in bounds), slow.text
        choice = client.post("/v1/completions", json={**body, "guided_choice": ["a", "b"]}, headers=ACME)
        assert choice.status_code == 200 and choice.json()["choices"][0]["text"] in ("a", "b"), choice.text

        # Batch size as advertised to TGI clients; prefix cache tiers as the engine sized them.
        assert client.get("/info").json()["max_concurrent_requests"] == LIMITS.max_batch_size
        metrics = client.get("/metrics").text
        device_bytes = metric_value(metrics, 'prefixserve_prefix_cache_bytes{tier="device"}')
        if TEST_ENGINE == "vllm":  # the device tier is vLLM's prefix table: the long prefix's rows
            row_bytes = long_spec.num_layers * 2 * long_spec.hidden_size * 4  # fp32 k and v per layer
            assert device_bytes == LONG_PREFIX * row_bytes
        else:  # the device tier (4096 bytes) is smaller than the long prefix: never there
            assert device_bytes == 0.0
        host_bytes = metric_value(metrics, 'prefixserve_prefix_cache_bytes{tier="host"}')
        assert host_bytes is not None and host_bytes > LIMITS.device_prefix_cache_bytes

        # Tenant limits are on (non-zero): ordinary traffic within them passes for another tenant too.
        assert generate(client, None, GLOBEX).status_code == 200

        # Versions kept per task: the configured number; an upload prunes the oldest.
        for _ in range(LIMITS.keep_versions + 1):
            assert upload(client, "kept", artifact_bytes(long_spec, seed=5, length=4)).status_code == 201
        kept = client.get("/v1/prefixes/kept", headers=ACME).json()
        assert [v["version"] for v in kept["versions"]] == [2, 3]

    # Waiting requests per tenant: a burst of long generations from one tenant fills its own queue (2)
    # and the batch (3); the rest are refused (429) for the tenant's bound, as 10 never reach the global 17.
    num_requests = 10
    assert num_requests < LIMITS.max_waiting  # so any refusal is the tenant's bound
    statuses = burst_of_long_generations(server.url, num_requests)
    assert {code for code, _ in statuses} == {200, 429}, statuses
    assert all('"overloaded"' in text for code, text in statuses if code == 429), statuses
    # How many were running before the rest arrived depends on timing; never more than batch + own queue
    # (on vLLM the batch is MAX_BATCH_SIZE plus the VLLM_MAX_QUEUED requests vLLM's own queue may hold).
    running = LIMITS.max_batch_size + (LIMITS.vllm_max_queued if TEST_ENGINE == "vllm" else 0)
    num_served = sum(code == 200 for code, _ in statuses)
    assert LIMITS.tenant_max_waiting <= num_served <= running + LIMITS.tenant_max_waiting

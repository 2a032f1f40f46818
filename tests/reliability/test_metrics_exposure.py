"""`/metrics` of a real server: what routers read (vLLM names) and what it must not show (task names).

`/metrics` needs no key (Prometheus scrapes it), so anyone who can reach the port reads it. Task names
are customers' data: by default none appear, neither as labels nor in the vLLM adapter lists; an
operator opts in (`PREFIXSERVE_METRICS_TASK_LABELS`, `PREFIXSERVE_METRICS_ADAPTER_NAMES`).
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.limits import Limits
from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, GLOBEX, TEST_ENGINE, generate, upload, wait_until

LONG = 400  # tokens: about a second or more per request on the 4096-position tiny model


def samples(client: httpx.Client) -> dict[str, list[Any]]:
    text = client.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_show_no_task_names_by_default(spawn_server, long_gpt2_dir, long_spec):
    server = spawn_server(model_dir=long_gpt2_dir, max_batch_size=1)
    with server.client() as client:
        assert upload(client, "acme-launch-plan", artifact_bytes(long_spec, 1)).status_code == 201
        assert upload(client, "globex-merger", artifact_bytes(long_spec, 2), GLOBEX).status_code == 201
        assert generate(client, "acme-launch-plan").status_code == 200
        background = threading.Thread(
            target=lambda: generate(server.client(), "globex-merger", GLOBEX, max_new_tokens=LONG)
        )
        background.start()
        try:
            scrapes = []

            def scraped_a_running_request() -> bool:
                scrapes.append(client.get("/metrics").text)
                return "prefixserve_requests_running 1.0" in scrapes[-1]

            wait_until(scraped_a_running_request, 60, "a running request")
        finally:
            background.join(timeout=120)
        scrapes.append(client.get("/metrics").text)
    text = "\n".join(scrapes)
    assert "vllm:lora_requests_info" in text  # the series is there, its adapter lists are empty
    for name in ("acme-launch-plan", "globex-merger", "launch", "merger"):
        assert name not in text, [line for line in text.splitlines() if name in line][:3]


def test_vllm_gauges_follow_requests_as_they_run_and_wait(spawn_server, long_gpt2_dir, long_spec):
    # One row: of three concurrent requests one runs and two wait, which is what a router must see.
    server = spawn_server(
        model_dir=long_gpt2_dir,
        max_batch_size=1,
        queue_timeout_s=600,  # the third request waits for two others on a possibly slow, shared CPU
        metrics_adapter_names="task",
        served_model_name="gpt2-test",
    )
    with server.client() as client:
        for seed, task in enumerate(("sql", "poems")):
            assert upload(client, task, artifact_bytes(long_spec, seed)).status_code == 201
        idle = samples(client)
        assert idle["vllm:num_requests_running"][0].labels == {"model_name": "gpt2-test"}
        assert idle["vllm:num_requests_running"][0].value == 0
        # max_lora: prefixes of max_prefix_length the device tier holds (the native engine's prefix
        # cache, the vLLM backend's prefix table: default sizes, fp32).
        limits = Limits()
        row = long_spec.num_layers * 2 * long_spec.num_heads * long_spec.head_dim * 4  # one position
        if TEST_ENGINE == "vllm":
            from server.vllm_backend.core import MAX_PREFIX_ROWS

            rows = min(limits.vllm_prefix_table_bytes // row, MAX_PREFIX_ROWS)
            max_lora = rows // limits.max_prefix_length
        else:
            max_lora = limits.device_prefix_cache_bytes // (row * limits.max_prefix_length)
        assert idle["vllm:lora_requests_info"][0].labels == {
            "max_lora": str(max_lora), "running_lora_adapters": "", "waiting_lora_adapters": "",
        }  # fmt: skip

        statuses: list[int] = []

        def request(task: str) -> None:
            with server.client(timeout=120) as c:
                statuses.append(generate(c, task, ACME, max_new_tokens=LONG, ignore_eos=True).status_code)

        threads = [threading.Thread(target=request, args=(t,)) for t in ("sql", "poems", "sql")]
        for t in threads:
            t.start()
        seen: dict[str, Any] = {}

        def one_running_two_waiting() -> bool:
            now = samples(client)
            running = now["vllm:num_requests_running"][0].value
            waiting = now["vllm:num_requests_waiting"][0].value
            # KV usage comes with each engine step (on the vLLM backend: vLLM's stats of its last step,
            # so it trails the admission by a step).
            if (running, waiting) == (1, 2) and now["vllm:kv_cache_usage_perc"][0].value > 0:
                seen.update(now)
                return True
            return False

        try:
            wait_until(
                one_running_two_waiting, 60, "1 running and 2 waiting requests, KV in use", interval=0.02
            )
        finally:
            for t in threads:
                t.join(timeout=180)
        assert statuses == [200, 200, 200]
        info = seen["vllm:lora_requests_info"][0].labels
        running_names = set(filter(None, info["running_lora_adapters"].split(",")))
        waiting_names = set(filter(None, info["waiting_lora_adapters"].split(",")))
        # Every wanted task is resident on the device (running list) or being loaded (waiting list).
        assert running_names | waiting_names == {"sql", "poems"} and not running_names & waiting_names, info
        assert seen["vllm:gpu_cache_usage_perc"][0].value == seen["vllm:kv_cache_usage_perc"][0].value

        def idle_again() -> bool:
            now = samples(client)
            return (
                now["vllm:num_requests_running"][0].value == 0
                and now["vllm:num_requests_waiting"][0].value == 0
                # Residency outlives the requests: the picker keeps sending these tasks here.
                and now["vllm:lora_requests_info"][0].labels["running_lora_adapters"] == "poems,sql"
                and now["vllm:lora_requests_info"][0].labels["waiting_lora_adapters"] == ""
                and now["vllm:kv_cache_usage_perc"][0].value == 0
            )

        wait_until(idle_again, 30, "the gauges to return to idle")

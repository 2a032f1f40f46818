"""`python -m server.main`: configuration errors, JSON access logs, graceful SIGTERM (exit 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtest.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    return {**env, **extra}


def test_missing_model_is_a_clear_start_up_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "server.main"], cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "PREFIXSERVE_MODEL" in proc.stderr


def test_bad_api_keys_json_is_a_clear_start_up_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "server.main"], cwd=tmp_path,
        env=_env(PYTHONPATH=str(ROOT), PREFIXSERVE_API_KEYS="{not json"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "PREFIXSERVE_API_KEYS" in proc.stderr


def test_sigterm_finishes_in_flight_generation_then_exits_0(tiny_gpt2_dir, tmp_path):
    settings = {
        "model": str(tiny_gpt2_dir),
        "device": "cpu",
        "local_store_dir": str(tmp_path / "store"),
        "shutdown_grace_s": "300",
    }
    server = ServerProcess(settings, tmp_path / "server.log", cwd=tmp_path).start()
    try:
        server.wait_ready(300)
        url = server.url
        result: dict[str, httpx.Response] = {}
        # Long enough (~1 s here) that the /metrics poll below sees it running; 60 tokens took 0.16 s,
        # which the poll could miss, and the test then waited out its deadline.
        body = {"inputs": "Long story", "parameters": {"max_new_tokens": 400}}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/generate", json=body, timeout=300)),
            daemon=True,
        )
        worker.start()
        # SIGTERM only once the request is in the running batch: a fixed sleep loses that race on a busy
        # machine, and a request still in flight before the engine saw it is rightly answered 503.
        deadline = time.monotonic() + 300
        while "prefixserve_requests_running 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the generation never started running"
            time.sleep(0.02)
        assert server.stop(timeout_s=300) == 0  # SIGTERM, then the server drains and exits
        worker.join(timeout=300)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["generated_text"]) > 0
    finally:
        server.stop(timeout_s=10)
    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    access = [
        r for r in records if r.get("logger") == "prefixserve.access" and r.get("endpoint") == "/v1/generate"
    ]
    assert access, lines
    line = access[0]
    assert line["status"] == 200 and line["tenant"] == "default" and line["request_id"]
    assert line["prompt_tokens"] > 0 and line["generated_tokens"] == 400
    assert {"ttft_s", "e2e_s"} <= set(line)


def test_engine_limits_come_from_the_environment(monkeypatch):
    from server.main import engine_config
    from server.settings import Settings

    monkeypatch.setenv("PREFIXSERVE_MAX_PREFILL_TOKENS", "1024")
    monkeypatch.setenv("PREFIXSERVE_KV_BUDGET_TOKENS", "50000")
    monkeypatch.setenv("PREFIXSERVE_DEVICE_PREFIX_CACHE_BYTES", "1000")
    monkeypatch.setenv("PREFIXSERVE_MAX_BATCH_SIZE", "7")
    config = engine_config(Settings())
    assert (config.limits.max_prefill_tokens, config.limits.kv_budget_tokens) == (1024, 50000)
    assert (config.limits.device_prefix_cache_bytes, config.limits.max_batch_size) == (1000, 7)


def test_cuda_graphs_and_torch_compile_switches_come_from_the_environment(monkeypatch):
    from server.main import native_options
    from server.settings import Settings

    assert (native_options(Settings()).cuda_graphs, native_options(Settings()).torch_compile) == (True, False)
    monkeypatch.setenv("PREFIXSERVE_CUDA_GRAPHS", "off")
    monkeypatch.setenv("PREFIXSERVE_TORCH_COMPILE", "on")
    config = native_options(Settings())
    assert (config.cuda_graphs, config.torch_compile) == (False, True)

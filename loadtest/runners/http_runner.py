"""`http`: the prefixserve server as a subprocess, driven over loopback HTTP like a real client.

The harness starts `python -m server.main` with a fresh local store, waits for `GET /ready`,
uploads every task's prefix through `POST /v1/prefixes`, warms each task with one short request,
then streams the workload through `POST /v1/completions` (`stream: true`, `temperature: 0`): the
OpenAI route takes the prompt as token ids, so the server sees exactly the tokens the other runners
see. Each SSE chunk is one token. Comparing with `engine` shows what HTTP, JSON and SSE cost.

The reported peak RSS is the server process's (reset after warm-up where Linux allows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import httpx

from loadtest import process
from loadtest.machine import process_peak_rss_bytes
from loadtest.metrics import RequestRecord, RunResult
from loadtest.runners.common import WARMUP_NEW_TOKENS, WARMUP_PROMPT_LEN, RunClock
from loadtest.runners.engine_runner import drive
from loadtest.workload import RequestSpec, Workload

READY_TIMEOUT_S = 300.0


class ServerProcess(process.ServerProcess):
    """`python -m server.main` with its own store directory and the benchmark's settings."""

    def __init__(
        self,
        model_dir: str,
        max_batch_size: int,
        device: str,
        dtype: str,
        max_waiting: int,
        log_path: Path,
        extra_env: dict[str, str] | None = None,  # more PREFIXSERVE_* settings (loadtest.fair_bench)
    ) -> None:
        self._store = tempfile.TemporaryDirectory(prefix="prefixserve-bench-http-")
        settings = {
            "model": model_dir,
            "local_store_dir": self._store.name,
            "max_batch_size": str(max_batch_size),
            "max_waiting": str(max_waiting),
            "queue_timeout_s": "3600",
            "device": device,
            "dtype": dtype,
            "log_level": "WARNING",
        }
        # More settings as PREFIXSERVE_* names (loadtest.fair_bench).
        settings.update({k.removeprefix("PREFIXSERVE_").lower(): v for k, v in (extra_env or {}).items()})
        log_path.unlink(missing_ok=True)  # one run's log per file
        super().__init__(settings, log_path)
        self.base_url = self.url
        self.start()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        super().wait_ready(timeout_s)

    def reset_peak_rss(self) -> None:
        with contextlib.suppress(OSError):  # not allowed everywhere; then the peak includes warm-up
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_rss_bytes(self) -> int:
        return process_peak_rss_bytes(self.pid) or 0

    def stop(self, timeout_s: float = 30.0) -> int | None:
        try:
            return super().stop(timeout_s)
        finally:
            self._store.cleanup()


async def _complete(
    client: httpx.AsyncClient, model: str, req: RequestSpec, task: str | None, arrival: float, clock: RunClock
) -> RequestRecord:
    rec = RequestRecord.of(req, task, arrival)
    body = {
        "model": model,
        "prompt": req.prompt_ids,
        "max_tokens": req.max_new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,  # exact output lengths, like every other runner
    }
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        rec.error = str(chunk["error"])
                        break
                    rec.token_times.append(clock.now())
                    reason = chunk["choices"][0].get("finish_reason")
                    if reason is not None:
                        rec.finish_reason = reason
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = rec.token_times[-1] if rec.token_times else clock.now()
    return rec


async def _run_http(server: ServerProcess, workload: Workload, artifacts: dict[str, bytes]) -> RunResult:
    concurrency = workload.spec.effective_concurrency
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=None, limits=limits) as client:
        for task, data in artifacts.items():
            files = {"artifact": (f"{task}.safetensors", data, "application/octet-stream")}
            resp = await client.post("/v1/prefixes", data={"task": task}, files=files)
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"uploading {task}: HTTP {resp.status_code} {resp.text[:300]}")
        base_model = (await client.get("/v1/models")).json()["data"][0]["id"]
        warm = RunClock()
        warm_req = RequestSpec(-1, "warm", "", [100] * WARMUP_PROMPT_LEN, WARMUP_NEW_TOKENS)
        warm_recs = await asyncio.gather(*(_complete(client, t, warm_req, t, 0.0, warm) for t in artifacts))
        failed = [r.error for r in warm_recs if r.error]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        server.reset_peak_rss()
        clock = RunClock()

        def send(req: RequestSpec, arrival: float) -> Awaitable[RequestRecord]:
            return _complete(client, req.task, req, req.task, arrival, clock)

        records = await drive(workload, clock, send)
        wall = clock.now()
    return RunResult(
        "http",
        records,
        wall,
        server.peak_rss_bytes(),
        extra={"server_log": str(server.log_path), "base_model_id": base_model},
    )


def run_http(
    model_dir: str,
    workload: Workload,
    artifacts: dict[str, bytes],
    max_batch_size: int,
    device: str,
    dtype: str,
    log_path: Path,
) -> RunResult:
    server = ServerProcess(
        model_dir, max_batch_size, device, dtype, max(256, len(workload.requests)), log_path
    )
    try:
        server.wait_ready()
        return asyncio.run(_run_http(server, workload, artifacts))
    finally:
        server.stop()

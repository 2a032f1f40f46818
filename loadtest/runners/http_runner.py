"""`http`: the prefixserve server as a subprocess, driven over loopback HTTP like a real client.

The harness starts `python -m server.main` with a fresh local store, waits for `GET /ready`,
uploads every task's prefix through `POST /v1/prefixes`, warms each task with one short request,
then streams the workload through `POST /v1/completions` (`stream: true`, `temperature: 0`): the
OpenAI route takes the prompt as token ids, so the server sees exactly the tokens the other runners
see. Comparing with `engine` shows what HTTP, JSON and SSE cost.

`server_vllm` and `server_native` are the same runner with `PREFIXSERVE_ENGINE` set, and the
client path (`stream_workload`) is the one `vllm_bare` (stock vLLM) is driven through too. Tokens are
counted from the `usage` every chunk carries (`stream_options.continuous_usage_stats`, vLLM's and
ours): a server may send two tokens in one chunk when the client falls behind, and each token gets
the chunk's arrival time.

The reported peak RSS is the server's, its worker processes included (vLLM's engine core runs in its
own process), reset after warm-up where Linux allows it.

`fields` adds request fields to some requests (`prefixserve bench --profile structured`: a JSON schema
on every other one); the warm-up requests carry `warm_fields`, so a constraint compiles before timing.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from loadtest import process
from loadtest.machine import process_titles, reset_tree_peak_rss, tree_cpu_seconds, tree_peak_rss_bytes
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
        process_env: dict[str, str] | None = None,  # other environment variables (vLLM's CPU settings)
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
        self.env.update(process_env or {})
        self.base_url = self.url
        self.start()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        super().wait_ready(timeout_s)

    def reset_peak_rss(self) -> None:
        reset_tree_peak_rss(self.pid)

    def peak_rss_bytes(self) -> int:
        return tree_peak_rss_bytes(self.pid)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        try:
            return super().stop(timeout_s)
        finally:
            self._store.cleanup()


# More body fields for a request (its constraint, ...), or none.
Fields = Callable[[RequestSpec], dict[str, object]]


async def _complete(
    client: httpx.AsyncClient,
    model: str,
    req: RequestSpec,
    task: str | None,
    arrival: float,
    clock: RunClock,
    fields: dict[str, object] | None = None,
) -> RequestRecord:
    rec = RequestRecord.of(req, task, arrival)
    body = {
        "model": model,
        "prompt": req.prompt_ids,
        "max_tokens": req.max_new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},  # tokens per chunk (see the module doc)
        "ignore_eos": True,  # exact output lengths, like every other runner
        **(fields or {}),
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
                    now = clock.now()
                    rec.token_times += [now] * chunk_tokens(chunk, len(rec.token_times))
                    reason = chunk["choices"][0].get("finish_reason") if chunk.get("choices") else None
                    if reason is not None:
                        rec.finish_reason = reason
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = rec.token_times[-1] if rec.token_times else clock.now()
    return rec


def chunk_tokens(chunk: dict[str, object], seen: int) -> int:
    """How many new tokens an SSE chunk carries: its running `usage.completion_tokens` less the tokens
    seen so far; a chunk without usage (a server that ignores `continuous_usage_stats`) counts as one
    token if it has a choice."""
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return max(0, usage["completion_tokens"] - seen)
    return 1 if chunk.get("choices") else 0


# A request's route: (the `model` it names, the task its record is counted under).
Route = Callable[[RequestSpec], tuple[str, str | None]]


async def stream_workload(
    base_url: str,
    workload: Workload,
    route: Route,
    warm_models: list[str],
    after_warm: Callable[[], None] | None = None,
    fields: Fields | None = None,
    warm_fields: dict[str, object] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Warm each of `warm_models` with one short request (all at once; `warm_fields` added), call
    `after_warm`, then stream the workload (open or closed loop, as `engine` drives it; `fields(req)`
    added to each request); returns the records and the wall time."""
    concurrency = workload.spec.effective_concurrency
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        warm = RunClock()
        warm_req = RequestSpec(-1, "warm", "", [100] * WARMUP_PROMPT_LEN, WARMUP_NEW_TOKENS)
        warm_recs = await asyncio.gather(
            *(_complete(client, m, warm_req, m, 0.0, warm, warm_fields) for m in warm_models)
        )
        failed = [r.error for r in warm_recs if r.error]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        if after_warm is not None:
            after_warm()
        clock = RunClock()

        def send(req: RequestSpec, arrival: float) -> Awaitable[RequestRecord]:
            model, task = route(req)
            return _complete(client, model, req, task, arrival, clock, fields(req) if fields else None)

        records = await drive(workload, clock, send)
        return records, clock.now()


async def upload_prefixes(base_url: str, artifacts: dict[str, bytes]) -> str:
    """Upload every task's prefix through `POST /v1/prefixes`; returns the server's base model id."""
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        for task, data in artifacts.items():
            files = {"artifact": (f"{task}.safetensors", data, "application/octet-stream")}
            resp = await client.post("/v1/prefixes", data={"task": task}, files=files)
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"uploading {task}: HTTP {resp.status_code} {resp.text[:300]}")
        return str((await client.get("/v1/models")).json()["data"][0]["id"])


def check_backend(pid: int, backend: str | None) -> None:
    """Raise unless the server runs the engine backend it was asked for (`PREFIXSERVE_ENGINE`): vLLM's
    engine core runs in a child process titled `VLLM::...`, the native engine has none. A server that
    does not know the setting (or falls back) must not be reported under the other backend's name."""
    if backend not in ("vllm", "native"):
        return
    on_vllm = any(title.startswith("VLLM::") for title in process_titles(pid))
    if on_vllm != (backend == "vllm"):
        raise RuntimeError(
            f"the server was started with PREFIXSERVE_ENGINE={backend} but "
            f"{'runs' if on_vllm else 'does not run'} vLLM's engine process (see its log)"
        )


def run_http(
    model_dir: str,
    workload: Workload,
    artifacts: dict[str, bytes],
    max_batch_size: int,
    device: str,
    dtype: str,
    log_path: Path,
    name: str = "http",
    settings: dict[str, str] | None = None,
    max_warm_tasks: int | None = None,
    process_env: dict[str, str] | None = None,
    fields: Fields | None = None,
    warm_fields: dict[str, object] | None = None,
) -> RunResult:
    """Serve `workload` through our server; `settings` are more PREFIXSERVE_* settings (the engine
    backend, tier sizes), `max_warm_tasks` warms only the first tasks (the rest load during the run),
    `process_env` more environment variables (`vllm_bare.vllm_cpu_env`: vLLM inside our server gets
    the same CPU settings as `vllm_bare`), `fields` / `warm_fields` more request fields (see the
    module docstring)."""
    server = ServerProcess(
        model_dir,
        max_batch_size,
        device,
        dtype,
        max(256, len(workload.requests)),
        log_path,
        settings,
        process_env,
    )
    backend = (settings or {}).get("engine")

    cpu_before: list[float] = []

    def after_warm() -> None:
        check_backend(server.pid, backend)
        server.reset_peak_rss()
        cpu_before.append(tree_cpu_seconds(server.pid))

    try:
        server.wait_ready()
        base_model = asyncio.run(upload_prefixes(server.base_url, artifacts))
        warm = list(artifacts)[:max_warm_tasks]
        records, wall = asyncio.run(
            stream_workload(
                server.base_url, workload, lambda r: (r.task, r.task), warm, after_warm, fields, warm_fields
            )
        )
        cpu_s = tree_cpu_seconds(server.pid) - cpu_before[0] if cpu_before else None
        return RunResult(
            name,
            records,
            wall,
            server.peak_rss_bytes(),
            extra={
                "server_log": str(log_path),
                "base_model_id": base_model,
                "settings": settings or {},
                "server_cpu_s": cpu_s,  # the server's process tree, from after the warm-up to the end
            },
        )
    finally:
        server.stop()

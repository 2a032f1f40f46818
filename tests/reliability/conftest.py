"""Reliability fixtures: real server processes and real redis-server processes on loopback ports.

- `ServerProcess`: `python -m server.main` with a tiny random GPT-2, settings from `PREFIXSERVE_*` env,
  on a free 127.0.0.1 port; `start()` waits for `/ready`. Its log goes to a file that failing
  assertions print (`log_tail()`).
- `RedisProcess`: a throwaway `redis-server --save "" --appendonly no` that a test stops and restarts
  on the same port.
- The in-process `make_api` / `loaded` fixtures of tests/api are re-exported here for tests that need
  to reach inside (fault injection into the model runner).
- `Victim`: another tenant's traffic (`/health` and a short generation, in turn) from its own process
  while a test attacks the server; `assert_victim_unaffected` checks it against its quiet value.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest import process
from modeling.models import make_model_dir
from tests.api.conftest import (  # noqa: F401  (fixtures and keys re-exported for this package)
    ACME,
    ACME_GEN,
    GLOBEX,
    KEYS,
    TEST_ENGINE,
    api_model_dir,
    loaded,
    make_api,
    vllm_core,
)
from tests.processes import RedisProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0  # importing torch + transformers on a loaded 2-core machine (2+ min seen)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server that keeps its data across a stop and start (append-only file in tmp_path)."""
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    server = RedisProcess(free_port(), data_dir=data_dir)
    server.start()
    yield server
    server.stop()


class ServerProcess(process.ServerProcess):
    """One `python -m server.main` process (see the module docstring; the launcher is `loadtest.process`).
    With `PREFIXSERVE_TEST_ENGINE=vllm` it serves on the vLLM backend (eager: no compile at start)."""

    def __init__(self, model_dir: Path, work_dir: Path, **settings: Any) -> None:
        port = free_port()
        defaults: dict[str, Any] = {
            "model": str(model_dir),
            "device": "cpu",
            "local_store_dir": str(work_dir / f"store-{port}"),
            "log_format": "text",
            "api_keys": json.dumps(KEYS),
            "shutdown_grace_s": "30",
        }
        if TEST_ENGINE == "vllm":
            # several servers share 2 cores: vLLM's threads unbound, one each (OMP_NUM_THREADS below)
            defaults.update({"engine": "vllm", "vllm_enforce_eager": "true", "vllm_cpu_threads": "none"})
        super().__init__({**defaults, **settings}, work_dir / f"server-{port}.log", cwd=REPO_ROOT, port=port)
        # several servers share a 2-core machine with other suites
        self.env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

    def start(self, wait_ready: bool = True, argv: list[str] | None = None) -> ServerProcess:  # type: ignore[override]
        super().start(argv)
        if wait_ready:
            wait_until(self.ready_or_dead, START_TIMEOUT_S, f"server /ready\n{self.log_tail()}", 0.2)
            assert self.proc is not None and self.proc.poll() is None, (
                f"server exited at start-up\n{self.log_tail()}"
            )
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def tree_rss_kib(self) -> int:
        """RSS of the server and every process under it (on vLLM: its engine core), in KiB."""
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total >> 10

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server did not exit within {timeout}s\n{self.log_tail()}")

    def stop(self) -> None:  # type: ignore[override]
        super().stop(timeout_s=20)


LONG_POSITIONS = 4096


# On the vLLM pass the servers' models have head_dim 32 (vLLM's CPU attention needs it): the tiny
# GPT-2 here is then the API tests' model (the same preset, seed and init, so artifacts built for
# `loaded` fit it).
TINY_PRESET = "tiny-gpt2-h32" if TEST_ENGINE == "vllm" else "tiny-gpt2"

if TEST_ENGINE == "vllm":

    @pytest.fixture(scope="session")
    def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return make_model_dir(
            TINY_PRESET, tmp_path_factory.mktemp("tiny-gpt2-h32"), seed=0, initializer_range=0.3
        )


@pytest.fixture(scope="session")
def long_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with 4096 positions: a generation that lasts seconds even on a fast CPU."""
    return make_model_dir(
        TINY_PRESET, tmp_path_factory.mktemp("long-gpt2"), seed=0, n_positions=LONG_POSITIONS
    )


@pytest.fixture(scope="session")
def long_spec(long_gpt2_dir: Path) -> Any:
    """The `ModelSpec` (with fingerprint) of `long_gpt2_dir`, to build artifacts its servers accept."""
    from modeling.models import load_model

    return load_model(str(long_gpt2_dir), device="cpu", dtype="float32").spec


@pytest.fixture
def spawn_server(tiny_gpt2_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: `spawn_server(max_batch_size=1, ...)` starts a server and waits for /ready; all are
    stopped at teardown. `model_dir=` serves another model than the tiny GPT-2."""
    servers: list[ServerProcess] = []

    def spawn(
        wait_ready: bool = True, argv: list[str] | None = None, model_dir: Path | None = None, **settings: Any
    ) -> ServerProcess:
        server = ServerProcess(model_dir or tiny_gpt2_dir, tmp_path, **settings)
        servers.append(server)
        return server.start(wait_ready=wait_ready, argv=argv)

    yield spawn
    for server in servers:
        server.stop()


def upload(client: httpx.Client, task: str, data: bytes, headers: dict[str, str] = ACME) -> httpx.Response:
    files = {"artifact": ("prefix.safetensors", data, "application/octet-stream")}
    return client.post("/v1/prefixes", data={"task": task}, files=files, headers=headers)


def generate(
    client: httpx.Client, task: str | None = None, headers: dict[str, str] = ACME, **params: Any
) -> httpx.Response:
    body = {"task": task, "inputs": "Hello world", "parameters": {"max_new_tokens": 4, **params}}
    return client.post("/v1/generate", json=body, headers=headers)


def metric_value(text: str, sample: str) -> float | None:
    """The value of one exposition line `sample value` (e.g. 'prefixserve_requests_running')."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


_PROBE = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=60) as client:
    while True:
        start = time.perf_counter()
        status = client.get("/health").status_code
        print(status, time.perf_counter() - start, flush=True)
        time.sleep(0.05)
"""


class HealthProbe:
    """Polls `/health` from its own process while an attack runs (so the attacking client's own CPU
    use does not count); `worst` is the slowest answer seen, `SLO_S` what the issue asks for."""

    SLO_S = 1.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.statuses: set[int] = set()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            status, seconds = line.split()
            self.statuses.add(int(status))
            self.latencies.append(float(seconds))

    def __enter__(self) -> HealthProbe:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, self.url], stdout=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: len(self.latencies) >= 3, 60, "the /health probe")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._reader is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.statuses == {200}, self.statuses

    @property
    def worst(self) -> float:
        return max(self.latencies)


_VICTIM = """
import json, sys, time, httpx
url, key, task = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 4}}
if task is not None:
    body["task"] = task
with httpx.Client(base_url=url, timeout=120) as client:
    while True:
        start = time.perf_counter()
        status = client.get("/health").status_code
        print("health", status, time.perf_counter() - start, flush=True)
        start = time.perf_counter()
        status = client.post("/v1/generate", json=body, headers={"Authorization": key}).status_code
        print("generate", status, time.perf_counter() - start, flush=True)
        time.sleep(0.05)
"""


class Victim:
    """Another tenant's traffic from its own process (so the attacking client's CPU use does not count):
    `/health` and a short generation, in turn. `task`: a task of that tenant's (one the server has
    cached, so it needs no store read), or None for the base model."""

    def __init__(self, url: str, task: str | None = None, headers: dict[str, str] = GLOBEX) -> None:
        self.url = url
        self.task = task
        self.key = headers["Authorization"]
        self.samples: dict[str, list[float]] = {"health": [], "generate": []}
        self.statuses: set[int] = set()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, status, seconds = line.split()
            self.statuses.add(int(status))
            self.samples[kind].append(float(seconds))

    def run(self, min_generations: int) -> Victim:
        """Start; returns once `min_generations` were measured (the caller then attacks)."""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _VICTIM, self.url, self.key, json.dumps(self.task)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._reader.start()
        wait_until(lambda: len(self.samples["generate"]) >= min_generations, 120, "the victim's requests")
        return self

    def reset(self) -> None:
        """Forget what was measured so far (what follows is the window that counts)."""
        self.samples = {"health": [], "generate": []}
        self.statuses = set()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def median(self, kind: str) -> float:
        return statistics.median(self.samples[kind])


def quiet_generation_s(url: str, task: str | None = None, headers: dict[str, str] = GLOBEX) -> float:
    """The victim's median generation latency with nothing else running (12 generations)."""
    quiet = Victim(url, task, headers).run(min_generations=12)
    quiet.stop()
    assert quiet.statuses == {200}, quiet.statuses
    return quiet.median("generate")


def assert_victim_unaffected(victim: Victim, quiet_s: float) -> None:
    """While the attack ran: every victim request answered 200, its median generation latency stayed
    within 2x of its quiet value, and `/health` answered in under 100 ms at the median."""
    assert victim.statuses == {200}, victim.statuses
    assert len(victim.samples["generate"]) >= 3, victim.samples
    assert victim.median("generate") < 2 * quiet_s, (victim.median("generate"), quiet_s)
    assert victim.median("health") < 0.1, sorted(victim.samples["health"])

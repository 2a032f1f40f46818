"""The multi-replica load test: 3 server processes behind HAProxy on one Sentinel-managed Redis.

    python -m loadtest.fleet --out docs/bench/fleet-cpu-report.md     (about 5-10 minutes here)
    pytest -m fleet tests/loadtest/test_fleet.py                       (the same, with assertions)

What runs (every process is local, on free loopback ports, and stopped at the end):

- Redis: a master, two replicas and three sentinels (`loadtest.redis_sentinel`); servers use
  `redis+sentinel://` with `redis_min_replicas=1` (a write is acknowledged once the replica has it).
- 3 replicas of `python -m server.main` (the tiny random GPT-2 unless `--model`), each with a warm start
  of the `WARM_TASKS` most used tasks, behind HAProxy with `deploy/haproxy/haproxy.cfg` (least
  connections, health checks on `/ready`, connection failures retried on another replica).
- Load: `CLIENTS` threads sending generations for a mixed set of `TASKS` tasks (Zipf-like weights)
  through the proxy, and one thread uploading a new task version every `UPLOAD_EVERY_S`. A client
  retries a request on a connection error, 502, 503 or 504 (honouring Retry-After, at most
  `MAX_RETRIES` times): a request is "ok", "ok after retries" or "failed".

Timeline: load starts; after `WARMUP_S` replica 2 is SIGKILLed and restarted cold
(`warm_start_tasks=0`), taken out of the proxy (HAProxy runtime API) while its first requests for the
most used tasks are timed directly (TTFT, streamed), put back; then the same with a warm start; then
the Redis master is SIGKILLed (Sentinel fails over; the dead node is restarted as Kubernetes would);
load continues for `AFTER_S`. The report: requests ok / retried / failed (generations and uploads),
TTFT of the restarted replica's first requests with and without warm start and the store reads they
took, and store bytes read per replica process (`prefixserve_prefix_store_read_bytes_total`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.process import ChildProcess, ServerProcess, free_port
from loadtest.redis_sentinel import SentinelCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = 3
REDIS_REPLICAS = 2  # as deploy/k8s/components/redis-sentinel: writes stay available after a failover
TASKS = 8
WARM_TASKS = 4
CLIENTS = 3
PREFIX_LENGTH = 64
WARMUP_S = 15.0  # load before the first fault (use counts reach the store every 5 s)
AFTER_S = 10.0  # load after the Redis failover and the fan-out measurement
FAN_OUT_S = 8.0  # load after a new version of the most used task, before each replica's reads are read
UPLOAD_EVERY_S = 1.0
MAX_RETRIES = 5
START_TIMEOUT_S = 400.0
KEY = "fleet-manage-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def task_name(i: int) -> str:
    return f"task-{i}"


def task_weights() -> list[float]:
    return [1.0 / (i + 1) for i in range(TASKS)]  # Zipf-like: task-0 is the most used


@dataclass
class Outcomes:
    ok: int = 0
    ok_after_retries: int = 0
    failed: int = 0
    retries: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int, retries: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.retries += retries
            if status < 400:
                self.ok += 1
                self.ok_after_retries += retries > 0
            else:
                self.failed += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "ok_after_retries": self.ok_after_retries, "failed": self.failed,
            "retries": self.retries, "statuses": dict(self.statuses),
        }  # fmt: skip


def send(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[int, int]:
    """(final status, retries): retried on connection errors, 502, 503, 504 (Retry-After, capped 2 s)."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            response = client.request(method, path, **kwargs)
            status = response.status_code
            wait = min(2.0, float(response.headers.get("retry-after", "0.2") or 0.2))
        except httpx.TransportError:
            status, wait = 599, 0.2
        if status not in (502, 503, 504, 599) or attempt == MAX_RETRIES:
            return status, attempt
        time.sleep(wait)
    raise AssertionError("unreachable")


class HAProxy(ChildProcess):
    """haproxy -f deploy/haproxy/haproxy.cfg in front of `ports` (its addresses from the environment)."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise RuntimeError("haproxy not on PATH (apt-get install haproxy)")
        self.port = free_port()
        self.socket_path = workdir / "haproxy.sock"
        env = dict(os.environ)
        env["PREFIXSERVE_LB_ADDR"] = f"127.0.0.1:{self.port}"
        env["PREFIXSERVE_LB_SOCKET"] = str(self.socket_path)
        for i, port in enumerate(ports, start=1):
            env[f"PREFIXSERVE_REPLICA_{i}"] = f"127.0.0.1:{port}"
        super().__init__([exe, "-db", "-f", str(HAPROXY_CFG)], workdir / "haproxy.log", env)
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            return s.recv(65536).decode(errors="replace")

    def set_state(self, server: str, state: str) -> None:
        """`state`: "maint" (out of rotation) or "ready"."""
        self.command(f"set server replicas/{server} state {state}")


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (all label values)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(url: str) -> str:
    try:
        return httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def ttft(client: httpx.Client, task: str) -> float:
    """Seconds to the first streamed token of one request (TGI SSE)."""
    body = {"task": task, "inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}}
    start = time.perf_counter()
    with client.stream("POST", "/v1/generate_stream", json=body, headers=HEADERS) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{task}: {response.status_code} {response.read()[:200]!r}")
        first: float | None = None
        for line in response.iter_lines():  # read to the end: the request is complete before the next
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{task}: no token streamed")
    return first


@dataclass
class FirstRequests:
    warm_start: bool
    ready_s: float  # process start to /ready
    ttft_s: list[float]
    request_store_reads: float  # store reads the measured requests took
    warm_store_reads: float


class Fleet:
    def __init__(self, workdir: Path, model_dir: Path) -> None:
        self.workdir = workdir
        self.model_dir = model_dir
        self.cluster = SentinelCluster(workdir / "redis", replicas=REDIS_REPLICAS)
        self.replicas: list[ServerProcess] = []
        self.proxy: HAProxy | None = None
        self.bytes_read: dict[str, float] = {}  # replica instance -> store bytes read (at its end)
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()

    def log(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, what))
        print(f"[fleet {time.monotonic() - self.t0:7.1f}s] {what}", flush=True)

    def server(self, index: int, port: int | None = None, warm: bool = True) -> ServerProcess:
        settings = {
            "model": str(self.model_dir), "device": "cpu", "log_format": "text",
            "api_keys": json.dumps({KEY: {"tenant": "fleet", "role": "manage"}}),
            "redis_url": self.cluster.url, "redis_min_replicas": 1, "redis_replication_timeout_s": 1.0,
            "warm_start_tasks": WARM_TASKS if warm else 0, "max_prefix_length": PREFIX_LENGTH,
        }  # fmt: skip
        server = ServerProcess(
            settings, self.workdir / f"replica-{index}-{time.monotonic_ns()}.log", REPO_ROOT, port
        )
        server.env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        return server

    def start(self) -> None:
        self.cluster.start()
        self.log(f"redis: master + {REDIS_REPLICAS} replicas + 3 sentinels, {self.cluster.url}")
        self.replicas = [self.server(i + 1) for i in range(REPLICAS)]
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready(START_TIMEOUT_S)
        self.proxy = HAProxy(self.workdir, [r.port for r in self.replicas])
        self.proxy.start()
        self.proxy.wait_until(self._proxy_ready, 30, "haproxy")
        self.log(f"{REPLICAS} replicas ready behind haproxy at {self.proxy.url}")

    def _proxy_ready(self) -> bool:
        assert self.proxy is not None
        try:
            return httpx.get(f"{self.proxy.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for process in [self.proxy, *self.replicas]:
            if process is not None:
                process.stop(timeout_s=20)
        self.cluster.stop()

    def upload_tasks(self, spec: Any) -> None:
        assert self.proxy is not None
        with httpx.Client(base_url=self.proxy.url, timeout=60) as client:
            for i in range(TASKS):
                status, _ = send(client, "POST", "/v1/prefixes", data={"task": task_name(i)},
                                 files={"artifact": ("p.safetensors", artifact(spec, i), "application/octet-stream")},
                                 headers=HEADERS)  # fmt: skip
                if status != 201:
                    raise RuntimeError(f"upload of {task_name(i)}: {status}")

    def restart_and_time(self, index: int, warm: bool) -> FirstRequests:
        """SIGKILL replica `index`, restart it (warm start or not) out of the proxy's rotation, time its
        first request for each of the WARM_TASKS most used tasks, put it back."""
        assert self.proxy is not None
        old = self.replicas[index]
        self.bytes_read[f"r{index + 1} (until killed, {'before warm run' if warm else 'initial'})"] = metric(
            scrape(old.url), "prefixserve_prefix_store_read_bytes_total"
        )
        assert old.proc is not None
        old.proc.kill()
        old.stop()
        self.log(f"replica r{index + 1} killed (SIGKILL)")
        self.proxy.set_state(f"r{index + 1}", "maint")
        new = self.server(index + 1, port=old.port, warm=warm)
        self.replicas[index] = new
        started = time.monotonic()
        new.start()
        new.wait_ready(START_TIMEOUT_S)
        ready_s = time.monotonic() - started
        before = scrape(new.url)
        with httpx.Client(base_url=new.url, timeout=60) as client:
            times = [ttft(client, task_name(i)) for i in range(WARM_TASKS)]
        after = scrape(new.url)
        self.proxy.set_state(f"r{index + 1}", "ready")
        reads = 'prefixserve_prefix_store_reads_total{reason="request"}'
        result = FirstRequests(
            warm,
            ready_s,
            times,
            metric(after, reads) - metric(before, reads),
            metric(after, 'prefixserve_prefix_store_reads_total{reason="warm"}'),
        )
        self.log(
            f"replica r{index + 1} restarted ({'warm' if warm else 'cold'}) and ready after {ready_s:.1f} s; "
            f"its first requests: TTFT {', '.join(f'{t * 1000:.0f}' for t in times)} ms, "
            f"{result.request_store_reads:.0f} store reads (warm start: {result.warm_store_reads:.0f})"
        )
        return result

    def upload_fan_out(self, spec: Any) -> dict[str, Any]:
        """A new version of the most used task under load: what each replica reads from the store in
        the next `FAN_OUT_S` (each should read the new blob once, lazily, on its next request for it)."""
        assert self.proxy is not None
        before = {f"r{i + 1}": scrape(r.url) for i, r in enumerate(self.replicas)}
        data = artifact(spec, 500)
        files = {"artifact": ("p.safetensors", data, "application/octet-stream")}
        with httpx.Client(base_url=self.proxy.url, timeout=60) as client:
            status, _ = send(
                client, "POST", "/v1/prefixes", data={"task": task_name(0)}, files=files, headers=HEADERS
            )
        self.log(f"new version of {task_name(0)} uploaded ({status}, {len(data)} bytes)")
        time.sleep(FAN_OUT_S)
        reads = 'prefixserve_prefix_store_reads_total{reason="request"}'
        byte_reads = 'prefixserve_prefix_store_read_bytes_total{reason="request"}'
        per_replica = {}
        for i, r in enumerate(self.replicas):
            after = scrape(r.url)
            name = f"r{i + 1}"
            per_replica[name] = {
                "reads": metric(after, reads) - metric(before[name], reads),
                "bytes": metric(after, byte_reads) - metric(before[name], byte_reads),
            }
        self.log(f"fan-out over {FAN_OUT_S:.0f} s: {per_replica}")
        return {"blob_bytes": len(data), "seconds": FAN_OUT_S, "replicas": per_replica}

    def fail_over_redis(self) -> float:
        started = time.monotonic()
        old = self.cluster.kill_master()
        self.log("redis master killed (SIGKILL)")
        new = self.cluster.wait_for_failover(old)
        seconds = time.monotonic() - started
        self.log(f"sentinels promoted port {new} after {seconds:.1f}s; restarting the old master")
        self.cluster.restart(old)
        self.cluster.wait_until(
            lambda: self.cluster.connected_replicas(new) == REDIS_REPLICAS, 60, "the old master to rejoin"
        )
        self.log("old master rejoined as a replica")
        return seconds


def artifact(spec: Any, seed: int) -> bytes:
    import torch

    from prefix_store.artifact import dump_artifact, new_artifact

    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(spec.num_layers, 2, spec.num_heads, PREFIX_LENGTH, spec.head_dim, generator=g)
    return dump_artifact(new_artifact({"decoder": prefix}, spec, task=task_name(seed)))


def run(workdir: Path, model_dir: Path) -> dict[str, Any]:
    """The scenario of the module docstring; returns the report's numbers."""
    from modeling.models import load_model

    spec = load_model(str(model_dir), device="cpu", dtype="float32").spec
    fleet = Fleet(workdir, model_dir)
    generations, uploads = Outcomes(), Outcomes()
    stop = threading.Event()
    try:
        fleet.start()
        fleet.upload_tasks(spec)
        assert fleet.proxy is not None
        url = fleet.proxy.url

        def generate_loop(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.is_set():
                    task = task_name(rng.choices(range(TASKS), task_weights())[0])
                    body = {"task": task, "inputs": "Hello world", "parameters": {"max_new_tokens": 8}}
                    generations.record(*send(client, "POST", "/v1/generate", json=body, headers=HEADERS))

        def upload_loop() -> None:
            i = 0
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.wait(UPLOAD_EVERY_S):
                    i += 1
                    files = {
                        "artifact": ("p.safetensors", artifact(spec, 1000 + i), "application/octet-stream")
                    }
                    uploads.record(*send(client, "POST", "/v1/prefixes", data={"task": f"upload-{i}"},
                                         files=files, headers=HEADERS))  # fmt: skip

        threads = [threading.Thread(target=generate_loop, args=(c,)) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=upload_loop))
        for t in threads:
            t.start()
        fleet.log("load started")
        time.sleep(WARMUP_S)
        cold = fleet.restart_and_time(1, warm=False)
        time.sleep(6.0)  # the restarted replica serves (and its use counts reach the store)
        warm = fleet.restart_and_time(1, warm=True)
        failover_s = fleet.fail_over_redis()
        fan_out = fleet.upload_fan_out(spec)
        time.sleep(AFTER_S)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        fleet.log("load stopped")
        for i, replica in enumerate(fleet.replicas):
            fleet.bytes_read[f"r{i + 1} (at the end)"] = metric(
                scrape(replica.url), "prefixserve_prefix_store_read_bytes_total"
            )
        blob_bytes = len(artifact(spec, 0))
    finally:
        stop.set()
        fleet.stop()
    return {
        "generations": generations.as_dict(),
        "uploads": uploads.as_dict(),
        "restart_cold": cold.__dict__,
        "restart_warm": warm.__dict__,
        "redis_failover_s": failover_s,
        "fan_out": fan_out,
        "store_bytes_read": fleet.bytes_read,
        "blob_bytes": blob_bytes,
        "events": fleet.events,
    }


def report_markdown(result: dict[str, Any], command: str) -> str:
    g, u = result["generations"], result["uploads"]
    cold, warm = result["restart_cold"], result["restart_warm"]

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms (each: {', '.join(f'{v * 1000:.0f}' for v in values)})"

    lines = [
        "# Fleet load test: 3 replicas, HAProxy, Sentinel-managed Redis",
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Setup: {REPLICAS} replicas of the tiny random GPT-2 on CPU, {TASKS} tasks (prefix length "
        f"{PREFIX_LENGTH}, {result['blob_bytes']} bytes each), {CLIENTS} clients (Zipf-like task mix), "
        f"an upload every {UPLOAD_EVERY_S:.0f} s; warm start of the {WARM_TASKS} most used tasks; "
        f"Redis master + {REDIS_REPLICAS} replicas + 3 sentinels, writes acknowledged after WAIT 1.",
        "",
        "## Requests (through HAProxy; a client retries connection errors and 502/503/504, up to "
        f"{MAX_RETRIES} times)",
        "",
        "| | ok | of which after retries | failed | retries | statuses seen (final) |",
        "|---|---|---|---|---|---|",
        f"| generations | {g['ok']} | {g['ok_after_retries']} | {g['failed']} | {g['retries']} | {g['statuses']} |",
        f"| uploads | {u['ok']} | {u['ok_after_retries']} | {u['failed']} | {u['retries']} | {u['statuses']} |",
        "",
        f"Redis failover (master SIGKILLed to a new master accepting writes): {result['redis_failover_s']:.1f} s.",
        "",
        "## Fan-out of an upload (a new version of the most used task, under load)",
        "",
        f"Blob: {result['fan_out']['blob_bytes']:,} bytes. Store reads by requests in the "
        f"{result['fan_out']['seconds']:.0f} s after the upload, per replica (the new version is read "
        "lazily, once per replica; other reads are tasks that replica had not cached yet):",
        "",
        "| replica | blobs read | bytes read |",
        "|---|---|---|",
        *[
            f"| {name} | {v['reads']:.0f} | {v['bytes']:,.0f} |"
            for name, v in result["fan_out"]["replicas"].items()
        ],
        "",
        f"## The restarted replica's first requests (one per each of the {WARM_TASKS} most used tasks, "
        "sent to it directly while the proxy holds it out)",
        "",
        "| restart | process start to /ready | TTFT of the first requests | store reads they took | store reads of the warm start |",
        "|---|---|---|---|---|",
        f"| cold (`warm_start_tasks=0`) | {cold['ready_s']:.1f} s | {ms(cold['ttft_s'])} | {cold['request_store_reads']:.0f} | {cold['warm_store_reads']:.0f} |",
        f"| warm (`warm_start_tasks={WARM_TASKS}`) | {warm['ready_s']:.1f} s | {ms(warm['ttft_s'])} | {warm['request_store_reads']:.0f} | {warm['warm_store_reads']:.0f} |",
        "",
        "Reading: what the warm start removes is the store read (counted: 0 for the warm replica's first "
        "requests); with these 66 KB prefixes a read costs about a millisecond, so the TTFT difference here "
        "is mostly the loaded 2-core machine's noise and first-request effects. With gpt2-medium prefixes of "
        'L = 200 in bfloat16 each read moves 19.7 MB (docs/architecture.md, "Fleet").',
        "",
        "## Store bytes read per replica process (`prefixserve_prefix_store_read_bytes_total`)",
        "",
        "| replica | bytes read |",
        "|---|---|",
        *[f"| {name} | {value:,.0f} |" for name, value in result["store_bytes_read"].items()],
        "",
        "## Timeline",
        "",
        *[f"- {t:.1f} s: {what}" for t, what in result["events"]],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown report here (and .json beside it)")
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny random GPT-2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefixserve-fleet-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from modeling.models import make_model_dir

            model_dir = make_model_dir("tiny-gpt2", workdir / "model", seed=0)
        result = run(workdir, model_dir)
    command = "python -m loadtest.fleet " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report_markdown(result, command.strip())
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

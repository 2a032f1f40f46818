"""What the numbers were measured on, peak memory per runner, the matmul peak and model FLOPs.

Peak RSS: Linux keeps a resident-set high-water mark per process (`VmHWM` in /proc/<pid>/status)
and lets a process reset its own by writing "5" to /proc/self/clear_refs. `PeakMemory` resets it
before a runner and reads it after, so each runner's number is its own peak (model weights included,
since they are resident throughout). Where the reset is not allowed, a 20 ms sampler thread reads the
current RSS instead (it can miss very short spikes). CUDA: `torch.cuda.max_memory_allocated`.

FLOPs: "achieved FLOP/s" counts the matmul work a plain implementation must do for the *useful*
tokens (see `gpt2_flops` / `bart_flops`), divided by wall time, against a measured matmul peak of the
same machine, dtype and device (the best of a few large square matmuls). It is a utilisation
estimate, not a hardware counter.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_HWM_RE = re.compile(r"VmHWM:\s+(\d+)\s+kB")
_RSS_RE = re.compile(r"VmRSS:\s+(\d+)\s+kB")


def _status_kb(pid: int | str, pattern: re.Pattern[str]) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def process_peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The high-water resident set of a process (None where /proc is missing)."""
    kb = _status_kb(pid, _HWM_RE)
    return None if kb is None else kb * 1024


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now (a server's worker processes: vLLM's engine core)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            with contextlib.suppress(OSError):  # the thread or process ended meanwhile
                pids += [int(c) for c in (task / "children").read_text().split()]
        i += 1
    return pids


def process_titles(pid: int) -> list[str]:
    """The command lines (as set by `setproctitle` where a process renamed itself) of `pid` and its
    descendants, e.g. vLLM's `VLLM::EngineCore`."""
    titles = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            titles.append(
                Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            )
    return titles


def tree_peak_rss_bytes(pid: int) -> int:
    """The sum of the high-water resident sets of `pid` and its descendants (processes that exited
    already are not counted). Shared pages count once per process, so this can overstate."""
    return sum(process_peak_rss_bytes(p) or 0 for p in process_tree(pid))


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by `pid` and its living descendants (vLLM's engine core and
    worker included). A difference of two readings is what the tree spent in between."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def reset_tree_peak_rss(pid: int) -> None:
    """Reset the high-water marks of `pid` and its descendants where Linux allows it."""
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # not allowed everywhere; then the peak includes the warm-up
            Path(f"/proc/{p}/clear_refs").write_text("5")


def process_rss_bytes(pid: int | str = "self") -> int | None:
    kb = _status_kb(pid, _RSS_RE)
    return None if kb is None else kb * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring this process's peak RSS (and CUDA allocation) inside the block."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.peak_rss_bytes = 0
        self.peak_device_bytes: int | None = None
        self._reset_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss_bytes = max(self.peak_rss_bytes, process_rss_bytes() or 0)

    def __enter__(self) -> PeakMemory:
        self._reset_ok = _reset_peak_rss()
        if not self._reset_ok:
            self.peak_rss_bytes = process_rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._reset_ok:
            self.peak_rss_bytes = process_peak_rss_bytes() or 0
        if self.device is not None and self.device.type == "cuda":
            self.peak_device_bytes = int(torch.cuda.max_memory_allocated(self.device))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine, software versions and current load (a busy machine explains slow numbers)."""
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5
) -> dict[str, Any]:
    """FLOP/s of the best of `repeats` square matmuls (n x n @ n x n = 2 n^3 FLOPs)."""
    n = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, thread pool start
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"size": n, "dtype": str(dtype).removeprefix("torch."), "flop_s": 2 * n**3 / best}


def _linear_params(module: torch.nn.Module) -> int:
    """Weights of the matmuls in a module (Linear, and GPT-2's Conv1D which is a transposed Linear)."""
    total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.numel()
    return total


def gpt2_flops(
    model: torch.nn.Module, prompt_lens: list[int], output_lens: list[int], prefix_lens: list[int]
) -> float:
    """Forward FLOPs of greedy generation with a KV cache, per request summed.

    A request feeds prompt + n_out - 1 tokens through the blocks (the last sampled token is never fed
    back), computes logits for n_out positions (last prompt position + each decode step), and each fed
    token attends to (prefix + tokens so far): QK^T and AV cost 2 * 2 * d_model per key per layer.
    """
    config = model.config
    block_params = _linear_params(model.transformer.h)  # type: ignore[attr-defined]
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    total = 0.0
    for p, n, prefix in zip(prompt_lens, output_lens, prefix_lens, strict=True):
        fed = p + max(n, 1) - 1
        total += 2 * block_params * fed + 2 * vocab * d * n
        # Sum over fed positions i (0-based) of keys seen: prefix + i + 1.
        keys_seen = fed * prefix + fed * (fed + 1) / 2
        total += 4 * d * layers * keys_seen
    return total


def bart_flops(
    model: torch.nn.Module, source_lens: list[int], output_lens: list[int], prefix_lens: list[int]
) -> float:
    """Forward FLOPs of greedy BART generation: encoder over the source once, decoder per token.

    Cross-attention keys/values are projected once per source token; each decoder token runs its
    self-attention over (prefix + tokens so far) and cross-attention over the source.
    """
    config = model.config
    enc = model.model.encoder  # type: ignore[attr-defined]
    dec = model.model.decoder  # type: ignore[attr-defined]
    d, vocab = config.d_model, config.vocab_size
    enc_params = _linear_params(enc)
    dec_params = _linear_params(dec)
    cross_kv = sum(layer.encoder_attn.k_proj.weight.numel() * 2 for layer in dec.layers)
    total = 0.0
    for s, n, prefix in zip(source_lens, output_lens, prefix_lens, strict=True):
        total += 2 * enc_params * s + 4 * d * config.encoder_layers * s * s
        total += 2 * cross_kv * s
        steps = max(n, 1)  # decoder-start token + n - 1 fed tokens
        total += 2 * (dec_params - cross_kv) * steps + 2 * vocab * d * n
        keys_seen = steps * prefix + steps * (steps + 1) / 2
        total += 4 * d * config.decoder_layers * (keys_seen + steps * s)
    return total

"""Which cores vLLM's CPU threads are bound to (`PREFIXSERVE_VLLM_CPU_THREADS`).

vLLM's CPU build binds its OpenMP threads to cores by `VLLM_CPU_OMP_THREADS_BIND`. Its own `auto`
keeps one core per NUMA node free for the API process, which on a 2-core machine halves the cores the
model runs on (measured: a default start at 0.55x of vLLM bound to both cores). Our `auto` binds to
every core this process may use: its CPU affinity (what `taskset`, cpusets and Kubernetes' static CPU
manager grant), capped by its cgroup's CPU quota (a Kubernetes CPU limit), so the threads never
outnumber the CPU time the container may take. `vllm` keeps vLLM's own binding, `none` binds nothing
(OpenMP's own placement), and a list (`0-3,8`) is used as given. A `VLLM_CPU_OMP_THREADS_BIND` in the
environment wins: it is vLLM's own switch, set on purpose.

Pure functions over what the kernel reports (paths injectable), so tests can feed any cgroup layout.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cpu_list(text: str) -> list[int]:
    """`0-3,8` -> [0, 1, 2, 3, 8]; ValueError for anything else."""
    text = text.strip()
    if not _CPU_LIST.match(text):
        raise ValueError(f"not a CPU list (like 0-3,8): {text!r}")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"CPU range {part!r} runs backwards")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8] -> `0-3,8` (vLLM's format)."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs' worth of time this process's cgroup may use (quota / period), None if unlimited or
    unknown. cgroup v2 (`cpu.max`: "max 100000" or "200000 100000") or v1 (`cpu.cfs_quota_us`)."""
    v2, v1 = "", ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and controllers == "":
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        return None
    for directory in _ancestors(root, v2):  # a limit may be set on a parent (a pod above its container)
        text = _read(directory / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                return int(quota) / int(period)
    for directory in _ancestors(root / "cpu", v1):
        quota_text, period_text = (
            _read(directory / "cpu.cfs_quota_us"),
            _read(directory / "cpu.cfs_period_us"),
        )
        if quota_text is not None and period_text is not None and int(quota_text) > 0:
            return int(quota_text) / int(period_text)
    return None


def usable_cpus(affinity: Iterable[int] | None = None, quota: float | None = None) -> list[int]:
    """The cores to bind to: this process's affinity, the first ceil(quota) of them under a quota."""
    cpus = sorted(os.sched_getaffinity(0) if affinity is None else affinity)
    if quota is not None:
        cpus = cpus[: max(1, math.ceil(quota - 1e-9))]
    return cpus


def omp_threads_bind(setting: str, environment_value: str | None) -> tuple[str | None, str]:
    """(the `VLLM_CPU_OMP_THREADS_BIND` to set, or None to leave it, and why) for the setting."""
    if environment_value:
        return None, f"VLLM_CPU_OMP_THREADS_BIND={environment_value} (from the environment)"
    if setting == "vllm":
        return None, "vLLM's own binding (auto: one core per NUMA node left to the API process)"
    if setting == "none":
        return "nobind", "not bound (OpenMP's own placement)"
    if setting == "auto":
        quota = cgroup_cpu_quota()
        cpus = format_cpu_list(usable_cpus(quota=quota))
        limit = "" if quota is None else f", cgroup CPU limit {quota:g}"
        return cpus, f"cores {cpus} (this process's CPU affinity{limit})"
    cpus = format_cpu_list(parse_cpu_list(setting))
    return cpus, f"cores {cpus} (PREFIXSERVE_VLLM_CPU_THREADS)"


def _ancestors(root: Path, path: str) -> list[Path]:
    """root/path, then each parent up to root (v2 and v1 both nest: a pod's limit sits above)."""
    if not path:
        return [root]
    parts = [p for p in path.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None

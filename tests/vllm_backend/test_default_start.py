"""What a user's default start of the vLLM backend meets: the KV cache is ours to size (no free-RAM
fraction), vLLM's CPU threads are bound to every core the process may use (cgroup/affinity aware), and
what the prefix table cannot follow yet (tensor or data parallelism) is refused at start, clearly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from loadtest.process import ServerProcess
from modeling.models import LoadedModel
from server.engine.errors import EngineError
from server.limits import Limits
from server.vllm_backend.core import KV_HEADROOM_TOKENS, VllmOptions, kv_bytes_per_token, kv_cache_bytes
from server.vllm_backend.cpu_threads import (
    cgroup_cpu_quota,
    format_cpu_list,
    omp_threads_bind,
    parse_cpu_list,
    usable_cpus,
)

# ---- thread binding ---------------------------------------------------------------------------


def test_cpu_lists_read_and_write_like_vllm() -> None:
    assert parse_cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    assert format_cpu_list([8, 0, 1, 2, 3]) == "0-3,8"
    assert format_cpu_list([1]) == "1"
    for bad in ("", "a", "3-1", "0,,1", "0-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return tmp_path / "fs", tmp_path / "cgroup"


def test_a_kubernetes_cpu_limit_caps_the_cores_bound(tmp_path: Path) -> None:
    # cgroup v2: the limit sits on the pod, above the container's own (unlimited) cgroup.
    root, proc = _cgroup(
        tmp_path / "v2",
        "0::/kubepods/pod1/ctr\n",
        {"kubepods/pod1/cpu.max": "150000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n"},
    )
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert usable_cpus(affinity=[0, 1, 2, 3], quota=1.5) == [0, 1]
    # cgroup v1 (cpu,cpuacct controller), and no limit at all.
    root, proc = _cgroup(
        tmp_path / "v1",
        "4:memory:/x\n3:cpu,cpuacct:/docker/c1\n0::/\n",
        {"cpu/docker/c1/cpu.cfs_quota_us": "300000\n", "cpu/docker/c1/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_quota(root, proc) == 3.0
    root, proc = _cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) is None
    assert usable_cpus(affinity=[2, 3, 5], quota=None) == [2, 3, 5]
    assert usable_cpus(affinity=[2, 3, 5], quota=0.2) == [2]  # a fraction of a core still gets one


def test_the_binding_setting_and_vllms_own_switch() -> None:
    bind, why = omp_threads_bind("auto", None)
    assert bind == format_cpu_list(usable_cpus(quota=cgroup_cpu_quota()))  # every core we may use
    assert bind and "affinity" in why
    assert omp_threads_bind("vllm", None)[0] is None  # vLLM's auto binding, left in place
    assert omp_threads_bind("none", None)[0] == "nobind"
    assert omp_threads_bind("3,0-1", None)[0] == "0-1,3"
    assert omp_threads_bind("auto", "0")[0] is None  # VLLM_CPU_OMP_THREADS_BIND set on purpose wins


# ---- memory and parallelism -------------------------------------------------------------------


def test_the_kv_cache_holds_a_full_batch_unless_configured(h32: LoadedModel) -> None:
    per_token = kv_bytes_per_token(h32)
    spec = h32.spec
    assert per_token == spec.num_layers * 2 * spec.num_heads * spec.head_dim * 4  # fp32 k and v
    spare = KV_HEADROOM_TOKENS * per_token  # vLLM keeps a block for itself, and counts whole blocks
    limits = Limits(max_batch_size=8)
    assert kv_cache_bytes(h32, limits) == 8 * spec.max_positions * per_token + spare
    assert kv_cache_bytes(h32, Limits(vllm_kv_cache_bytes=10 << 20)) == 10 << 20
    shorter = Limits(max_batch_size=8, vllm_max_model_len=100)
    assert kv_cache_bytes(h32, shorter) == 8 * 100 * per_token + spare
    with pytest.raises(EngineError, match="PREFIXSERVE_VLLM_KV_CACHE_BYTES"):
        kv_cache_bytes(h32, Limits(vllm_kv_cache_bytes=per_token * 10))  # not one sequence


def test_tensor_and_data_parallelism_are_refused_with_the_reason() -> None:
    with pytest.raises(EngineError, match="TENSOR_PARALLEL_SIZE=2.*not sharded"):
        VllmOptions(model_dir="m", tensor_parallel_size=2).check()
    with pytest.raises(EngineError, match="DATA_PARALLEL_SIZE=2.*one engine"):
        VllmOptions(model_dir="m", data_parallel_size=2).check()
    VllmOptions(model_dir="m").check()


def test_a_server_asked_for_tensor_parallelism_exits_with_the_reason(h32_dir: Path, tmp_path: Path) -> None:
    settings = {"model": str(h32_dir), "engine": "vllm", "vllm_tensor_parallel_size": 2}
    server = ServerProcess({**settings, "local_store_dir": str(tmp_path / "store")}, tmp_path / "server.log")
    server.start()
    assert server.proc is not None
    assert server.proc.wait(timeout=120) == 2  # a configuration error, before vLLM starts
    assert "TENSOR_PARALLEL_SIZE=2" in server.log_path.read_text()


# ---- the default start beside other processes -------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    block = bytearray(int(sys.argv[1]))
    for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
        block[i] = 1
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


@pytest.mark.timeout(400)
def test_a_default_start_serves_while_other_processes_hold_a_fifth_of_the_ram(
    h32_dir: Path, tmp_path: Path
) -> None:
    """`prefixserve serve` of a GPT-2 with no vLLM environment variables at all, beside a process that
    holds a fifth of the machine's memory: vLLM's own default would reserve 92% of it and refuse."""
    total = psutil.virtual_memory().total
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(total // 5), "600"], stdout=subprocess.PIPE, text=True
    )
    settings = {"model": str(h32_dir), "log_format": "text", "local_store_dir": str(tmp_path / "store")}
    server = ServerProcess(settings, tmp_path / "server.log")
    for name in [k for k in server.env if k.startswith("VLLM_")]:  # what a user's shell has: none
        del server.env[name]
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # What made vLLM's own sizing refuse: less than 92% of the memory is free now.
        assert psutil.virtual_memory().available < 0.92 * total
        server.start().wait_ready(300)  # raises with the log's tail if it exits instead
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answer = client.post(
                "/v1/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}}
            )
        assert answer.status_code == 200, answer.text
        log = server.log_path.read_text()
        assert "engine: vLLM" in log  # `auto` picked vLLM
        assert "KV cache reserved" in log and "CPU threads bound to cores" in log, server.log_tail(60)
    finally:
        server.stop()
        holder.kill()
        holder.wait()

"""vLLM's engine core process dying under a real server (the vLLM backend's counterpart of the native
engine loop crash in test_faults.py): readiness turns off, requests get 503, and the process exits
non-zero so that its supervisor restarts it. Run by the vLLM pass (`make test-vllm`)."""

from __future__ import annotations

import psutil
import pytest

from tests.reliability.conftest import TEST_ENGINE, generate, wait_until

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(TEST_ENGINE != "vllm", reason="the vLLM backend's engine core: the vLLM pass runs it"),
]


def _engine_core_processes(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_killed_engine_core_turns_readiness_off_and_exits_the_process_non_zero(spawn_server):
    server = spawn_server(shutdown_grace_s=5)
    with server.client(timeout=30) as client:
        assert generate(client, None, max_new_tokens=3).status_code == 200
        cores = _engine_core_processes(server.pid)
        assert cores, f"no vLLM engine core process under the server\n{server.log_tail()}"
        for core in cores:
            core.kill()

        def refused() -> bool:
            try:
                return generate(client, None, max_new_tokens=3).status_code == 503
            except Exception:  # the server may already be exiting
                return True

        wait_until(refused, 30.0, "generation to be refused with 503")
    code = server.wait_exit(timeout=60)
    assert code not in (0, None) and code > 0, (code, server.log_tail())
    assert "engine loop died" in server.log_tail(200)

"""One way to run the server as a process: `python -m server.main` on a free loopback port.

Used by the HTTP benchmark runner, `make demo` (prefixserve.demo) and the tests that need a real
server (tests/reliability, tests/training/test_train_serve.py). It lives in `loadtest`, the lowest layer
the demo and the load test both may import (docs/architecture.md).

Settings go in as `PREFIXSERVE_<NAME>` environment variables on top of the caller's environment with
every other `PREFIXSERVE_*` removed, so a stray key in a shell cannot change what runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """The caller's environment without `PREFIXSERVE_*`, plus `PREFIXSERVE_<KEY>` for each setting
    (strings as they are, other values as JSON, None: left unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    for key, value in settings.items():
        if value is not None:
            env[f"PREFIXSERVE_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


class ServerProcess:
    """`python -m server.main` with `settings` (host and port are set here) logging to `log_path`."""

    def __init__(
        self, settings: Mapping[str, Any], log_path: Path, cwd: Path | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env({**settings, "host": "127.0.0.1", "port": str(self.port)})
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, argv: list[str] | None = None) -> ServerProcess:
        """Start it (`argv` replaces `python -m server.main`, e.g. a wrapper script); does not wait."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        cmd = argv or [sys.executable, "-m", "server.main"]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def ready_or_dead(self) -> bool:
        """True once `/ready` answers 200, or once the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            return True
        try:
            return httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for `/ready`; raises RuntimeError if the process exits, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready_or_dead():
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(0.2)
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode} at start-up\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after `timeout_s`; returns the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

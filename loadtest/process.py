"""One way to run the server as a process: `python -m server.main` on a free loopback port
(`ServerProcess`), on top of `ChildProcess`, which the tests' Redis launcher uses too.

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
from collections.abc import Callable, Mapping
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


class ChildProcess:
    """A child process with its stdout and stderr in `log_path` (None: discarded) that can be started
    again after `stop` (tests restart a Redis on the same port). `stop` is SIGTERM, then SIGKILL."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ChildProcess:
        """Start it; does not wait (see `wait_until`)."""
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
        """Poll `ready()` until true; RuntimeError if the process exits first, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.exited():
                assert self.proc is not None
                raise RuntimeError(f"{what}: exited with {self.proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(poll_s)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit status (None if never started)."""
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


class ServerProcess(ChildProcess):
    """`python -m server.main` with `settings` (host and port are set here) logging to `log_path`."""

    log_path: Path

    def __init__(
        self, settings: Mapping[str, Any], log_path: Path, cwd: Path | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = server_env({**settings, "host": "127.0.0.1", "port": str(self.port)})
        super().__init__([sys.executable, "-m", "server.main"], log_path, env, cwd)
        self.env: dict[str, str] = env

    def start(self, argv: list[str] | None = None) -> ServerProcess:  # type: ignore[override]
        """Start it (`argv` replaces `python -m server.main`, e.g. a wrapper script); does not wait."""
        if argv:
            self.argv = argv
        super().start()
        return self

    def ready_or_dead(self) -> bool:
        """True once `/ready` answers 200, or once the process has exited."""
        if self.exited():
            return True
        try:
            return httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for `/ready`; raises RuntimeError if the process exits, TimeoutError after `timeout_s`."""
        self.wait_until(self.ready_or_dead, timeout_s, "server")
        if self.exited():
            raise RuntimeError(f"server: exited at start-up\n{self.log_tail()}")

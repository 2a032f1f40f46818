"""Helpers for tests that run real processes on loopback: a throwaway redis-server, and `free_port`
(from `loadtest.process`, the one server-process helper shared with the demo and the load test)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from loadtest.process import free_port

__all__ = ["RedisProcess", "free_port"]


class RedisProcess:
    """A redis-server on a fixed loopback port that a test can stop and restart (the same port again, as
    after a real outage). Without `data_dir` it keeps nothing; with one it keeps its data across restarts
    (append-only file), like a production Redis."""

    def __init__(self, port: int, data_dir: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not on PATH (apt-get install redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is None:
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--dir", str(self.data_dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port} in {timeout}s")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None

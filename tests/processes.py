"""Helpers for tests that run real processes on loopback: a throwaway redis-server (a
`loadtest.process.ChildProcess`, the process helper shared with the demo and the load test), and
`free_port`."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from loadtest.process import ChildProcess, free_port

__all__ = ["RedisProcess", "free_port"]


class RedisProcess:
    """A redis-server on a fixed loopback port that a test can stop and restart (the same port again, as
    after a real outage). Without `data_dir` it keeps nothing; with one it keeps its data across restarts
    (append-only file), like a production Redis."""

    def __init__(self, port: int, data_dir: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.data_dir = data_dir
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not on PATH (apt-get install redis-server)")
        args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        if data_dir is None:
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--dir", str(data_dir)]
        self.process = ChildProcess(args)

    def start(self, timeout: float = 15.0) -> None:
        self.process.start().wait_until(self.ping, timeout, f"redis-server on port {self.port}", poll_s=0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        self.process.stop(timeout_s=15)

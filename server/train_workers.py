"""The embedded default's training workers: `prefixserve serve` starts `prefixserve train-worker`
processes beside itself (`Settings.embedded_train_workers()`: 1 without Redis), so fine-tuning jobs
need no extra service. They are separate processes (a serving process never trains); this module
restarts one that dies (like a Deployment would, with a growing delay if it keeps dying) and stops
them with the server (SIGTERM: each checkpoints its job and puts it back in the queue).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from server.settings import Settings

logger = logging.getLogger("prefixserve.main")

RESTART_DELAY_S = (1.0, 30.0)  # first and longest wait before starting a worker that died again
STOP_TIMEOUT_S = 30.0  # a worker checkpoints on SIGTERM; beyond this it is killed


class EmbeddedWorkers:
    """`count` worker processes with the server's settings (module docstring)."""

    def __init__(self, settings: Settings, count: int) -> None:
        argv = [sys.executable, "-m", "prefixserve", "train-worker", "--parent-pid", str(os.getpid())]
        # The settings given on the server's command line; the rest come from the same environment.
        for flag, value in (("--model", settings.model), ("--device", settings.device),
                            ("--redis-url", settings.redis_url), ("--log-level", settings.log_level)):  # fmt: skip
            if value:
                argv += [flag, str(value)]
        self.argv = argv
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="prefixserve-train-workers", daemon=True)

    def start(self) -> EmbeddedWorkers:
        if self.procs:
            for i in range(len(self.procs)):
                self.procs[i] = subprocess.Popen(self.argv)
            logger.info("started %d training worker process(es)", len(self.procs))
            self._thread.start()
        return self

    def _supervise(self) -> None:
        delay = [RESTART_DELAY_S[0]] * len(self.procs)
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                logger.warning(
                    "training worker %d exited with %s; restarting in %.0f s",
                    proc.pid,
                    proc.returncode,
                    delay[i],
                )
                if self._stopping.wait(delay[i]):
                    return
                delay[i] = min(delay[i] * 2, RESTART_DELAY_S[1])
                self.procs[i] = subprocess.Popen(self.argv)

    def stop(self) -> None:
        self._stopping.set()
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

"""The embedded default's training workers: `prefixserve serve` starts `prefixserve train-worker`
processes beside itself (`Settings.embedded_train_workers()`: 1 without Redis), so fine-tuning jobs
need no extra service. They are separate processes (a serving process never trains), started when
the job store holds work for them (a job queued, or running with a worker that may be gone) and
exiting after `IDLE_EXIT_S` without any: an idle server holds no training process and its memory.
A worker that dies is replaced while there is work (with a growing delay if it keeps dying); the
server stops its workers when it stops (SIGTERM: each checkpoints its job and puts it back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from prefix_store.base import StoreUnavailable
from prefix_store.jobs.factory import make_job_store
from prefix_store.jobs.model import QUEUED, RUNNING
from server.settings import Settings

logger = logging.getLogger("prefixserve.main")

POLL_S = 1.0  # how often the job store is asked whether there is work
IDLE_EXIT_S = 300.0  # a worker without a job for this long exits (one is started again on demand)
RESTART_DELAY_S = (1.0, 30.0)  # first and longest wait before starting again after a failed worker
STOP_TIMEOUT_S = 30.0  # a worker checkpoints on SIGTERM; beyond this it is killed


class EmbeddedWorkers:
    """Up to `count` worker processes with the server's settings (module docstring)."""

    def __init__(self, settings: Settings, count: int) -> None:
        argv = [sys.executable, "-m", "prefixserve", "train-worker", "--parent-pid", str(os.getpid()),
                "--idle-exit-s", str(IDLE_EXIT_S)]  # fmt: skip
        # The settings given on the server's command line; the rest come from the same environment.
        for flag, value in (("--model", settings.model), ("--device", settings.device),
                            ("--redis-url", settings.redis_url), ("--log-level", settings.log_level)):  # fmt: skip
            if value:
                argv += [flag, str(value)]
        self.argv = argv
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self._store = make_job_store(
            settings.redis_url, settings.fine_tuning_data_dir(), settings.redis_key_prefix,
            call_timeout_s=settings.limits.store_timeout_s,
        )  # fmt: skip
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="prefixserve-train-workers", daemon=True)

    def start(self) -> EmbeddedWorkers:
        if self.count > 0:
            self._thread.start()
        return self

    def _supervise(self) -> None:
        loop = asyncio.new_event_loop()
        delay, not_before = RESTART_DELAY_S[0], 0.0
        try:
            while not self._stopping.wait(POLL_S):
                for proc in [p for p in self.procs if p.poll() is not None]:
                    self.procs.remove(proc)
                    if proc.returncode == 0:  # it exited idle
                        delay = RESTART_DELAY_S[0]
                        continue
                    logger.warning("training worker %d exited with %s", proc.pid, proc.returncode)
                    not_before = time.monotonic() + delay
                    delay = min(delay * 2, RESTART_DELAY_S[1])
                if len(self.procs) >= self.count or time.monotonic() < not_before:
                    continue
                if self._work_waiting(loop):
                    self.procs.append(subprocess.Popen(self.argv))
                    logger.info("started a training worker (pid %d)", self.procs[-1].pid)
        finally:
            loop.run_until_complete(self._store.close())
            loop.close()

    def _work_waiting(self, loop: asyncio.AbstractEventLoop) -> bool:
        try:
            counts = loop.run_until_complete(self._store.status_counts())
        except StoreUnavailable:
            return False
        # A running job with no live worker here may have lost its worker: a new one takes it back.
        return counts.get(QUEUED, 0) > 0 or (counts.get(RUNNING, 0) > 0 and not self.procs)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=POLL_S + 10)
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

"""`prefixserve train-worker`: a training worker process (`training.worker`), configured like the server.

It reads the same settings as `prefixserve serve` (`PREFIXSERVE_*`: the model, the device, the Redis
URL and key prefix, `FINE_TUNING_DIR`, the limits, `TRAINING_LEASE_S`), loads the base model once and
trains the jobs it claims until SIGTERM (then it checkpoints the job in hand and puts it back in the
queue). `prefixserve serve` starts such processes beside itself in the embedded default
(`PREFIXSERVE_TRAIN_WORKERS`); in a fleet they run as their own Deployment (deploy/k8s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from server.logging import configure_logging
from server.settings import Settings

if TYPE_CHECKING:  # torch is imported only once the settings are valid
    from training.worker import Worker

logger = logging.getLogger("prefixserve.worker")
EXIT_CONFIG = 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prefixserve train-worker",
        description="Train queued fine-tuning jobs (settings: PREFIXSERVE_* env, as the server).",
    )
    parser.add_argument("--model", help="the base model (PREFIXSERVE_MODEL)")
    parser.add_argument("--device", help="auto | cpu | cuda (PREFIXSERVE_DEVICE)")
    parser.add_argument("--redis-url", dest="redis_url", help="Redis URL (PREFIXSERVE_REDIS_URL)")
    parser.add_argument("--log-level", dest="log_level", help="PREFIXSERVE_LOG_LEVEL")
    parser.add_argument(
        "--parent-pid", type=int, help="stop (checkpointing the job in hand) once this process is gone"
    )
    parser.add_argument("--idle-exit-s", type=float, help="exit after this many seconds without a job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("parent_pid", "idle_exit_s")
    }
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as exc:
        print(f"prefixserve train-worker: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    if not settings.model:
        logger.error("no model: set PREFIXSERVE_MODEL (or --model) to the served base model")
        return EXIT_CONFIG

    from modeling.models import load_model
    from prefix_store.jobs.factory import make_job_store
    from training.worker import Worker, WorkerConfig

    loaded = load_model(settings.model, device=settings.device, dtype="float32")  # training is float32
    store = make_job_store(
        settings.redis_url, settings.fine_tuning_data_dir(), settings.redis_key_prefix,
        call_timeout_s=settings.limits.store_timeout_s,
    )  # fmt: skip
    config = WorkerConfig(
        worker_id=f"{socket.gethostname()}:{os.getpid()}",
        lease_s=settings.training_lease_s,
        max_running_per_tenant=settings.limits.tenant_max_running_jobs,
        idle_exit_s=args.idle_exit_s,
    )
    logger.info("training worker ready", extra={"worker": config.worker_id, "model": settings.model})
    asyncio.run(_serve(Worker(store, loaded, config), args.parent_pid))
    return 0


async def _serve(worker: Worker, parent_pid: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    await worker.store.start()
    try:
        await worker.run(stop)
    finally:
        if watch is not None:
            watch.cancel()
        await worker.store.close()
    logger.info("training worker stopped")


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """An embedded worker outlives no server: a server killed outright leaves it orphaned (re-parented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    logger.warning("the server that started this worker is gone; stopping")
    stop.set()

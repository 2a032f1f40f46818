"""`make_job_store`: the job store that goes with the prefix store (Redis when a URL is set)."""

from __future__ import annotations

from pathlib import Path

from prefix_store.jobs.base import JobStore
from prefix_store.jobs.local import LocalJobStore

__all__ = ["default_data_dir", "make_job_store"]

DATA_DIR_NAME = ".fine-tuning"  # not a valid tenant name: the local prefix store never lists it


def default_data_dir(local_store_dir: Path) -> Path:
    """Files and job work beside the local prefix store's tenants (the embedded default)."""
    return Path(local_store_dir) / DATA_DIR_NAME


def make_job_store(
    redis_url: str | None, data_dir: Path, key_prefix: str = "prefixserve", call_timeout_s: float = 5.0
) -> JobStore:
    """A `RedisJobStore` when `redis_url` is set (records in Redis, bytes in `data_dir`, a shared
    volume), else a `LocalJobStore` in `data_dir`."""
    if redis_url:
        from prefix_store.jobs.redis_jobs import RedisJobStore  # a local deployment never imports redis

        return RedisJobStore(redis_url, data_dir, key_prefix=key_prefix, call_timeout_s=call_timeout_s)
    return LocalJobStore(data_dir)

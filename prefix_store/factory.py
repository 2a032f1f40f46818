"""`make_store`: pick the prefix store backend from configuration (Redis if a URL is set)."""

from __future__ import annotations

from pathlib import Path

from prefix_store.base import PrefixStore
from prefix_store.local_store import LocalPrefixStore

__all__ = ["make_store"]


def make_store(
    redis_url: str | None,
    local_dir: Path,
    key_prefix: str = "prefixserve",
    keep_versions: int = 5,
    socket_timeout: float = 2.0,
    retries: int = 3,
    resync_interval_s: float = 5.0,
    min_replicas: int = 0,
    replication_timeout_s: float = 2.0,
    call_timeout_s: float = 5.0,
) -> PrefixStore:
    """A `RedisPrefixStore` when `redis_url` is set (shared by replicas; `redis+sentinel://` for a
    Sentinel-managed master), else a `LocalPrefixStore`.

    The Redis-only arguments (`call_timeout_s`: the deadline of each call) are ignored for the local
    store, whose calls are bounded by the disk. Call `await store.start()` before use
    and `await store.close()` on shutdown.
    """
    if redis_url:
        # Imported here so that a local-only deployment never needs to import redis.
        from prefix_store.redis_store import RedisPrefixStore

        return RedisPrefixStore(
            redis_url,
            key_prefix=key_prefix,
            keep_versions=keep_versions,
            socket_timeout=socket_timeout,
            retries=retries,
            resync_interval_s=resync_interval_s,
            min_replicas=min_replicas,
            replication_timeout_s=replication_timeout_s,
            call_timeout_s=call_timeout_s,
        )
    return LocalPrefixStore(Path(local_dir), keep_versions=keep_versions)

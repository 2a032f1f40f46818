"""Warm start: before a replica reports ready, load the most used tasks' prefixes into its tiers.

A replica that starts cold makes the first request of every task pay a store read (and on a fleet,
every replica reads the same hot blobs from Redis at once after a rollout). So the lifespan, after
the engine starts and before the server listens (so before `/ready` can answer 200), asks the store
for the `warm_start_tasks` most used tasks (the counts every replica adds to, `prefix_store.usage`)
and calls `Engine.warm` for each, most used first. Bounded:

- time: `warm_start_timeout_s` for the whole warm start; then the replica becomes ready anyway (the
  tasks not yet loaded are read by their first request, as without a warm start);
- memory: the prefix cache's tier budgets. A warmed task enters the host tier as least recent, so
  warming never pushes out a more used task; the device tier takes a task only where it has room.

Store reads made here are counted as `prefixserve_prefix_store_reads_total{reason="warm"}`; the first
requests for warm tasks then read nothing (`reason="request"` stays put), which the tests assert.
A store that is down makes the warm start end at once (the replica starts cold, and ready).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prefix_store.base import PrefixStore

logger = logging.getLogger(__name__)


async def warm_start(engine: Any, store: PrefixStore, metrics: Any, max_tasks: int, timeout_s: float) -> int:
    """Warm up to `max_tasks` tasks within `timeout_s`; returns how many were loaded. Never raises."""
    if max_tasks <= 0 or timeout_s <= 0:
        return 0
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        tasks = await asyncio.wait_for(store.most_used(max_tasks), timeout_s)
    except Exception as exc:  # a store that is down: start cold
        logger.warning("warm start skipped: could not read the most used tasks (%s)", type(exc).__name__)
        return 0
    loaded = 0
    for tenant, task in tasks:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logger.warning(
                "warm start stopped after %.1f s: %d of %d tasks loaded", timeout_s, loaded, len(tasks)
            )
            break
        try:
            ok = await asyncio.wait_for(engine.warm(tenant, task), remaining)
        except asyncio.TimeoutError:
            ok = False
        loaded += ok
        metrics.warm_start_tasks.labels(outcome="loaded" if ok else "failed").inc()
    logger.info("warm start: %d of %d tasks loaded in %.2f s", loaded, len(tasks), time.monotonic() - started)
    return loaded

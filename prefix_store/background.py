"""Stopping background tasks for sure.

`task.cancel()` delivers one `CancelledError` at the task's next await, and a client library may turn
it into an error of its own (redis-py can raise a `ConnectionError` from a cancelled command). A
background loop that catches errors to retry — the store's change listener, a probe, a poller — then
goes on, and a shutdown that awaits it waits forever. `stop_tasks` cancels again until each task has
ended (the next cancel lands in the loop's own sleep), within a bound.

It lives in the prefix store because that is the lowest layer that runs background work; the API and
the engine use it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

logger = logging.getLogger("prefixserve.background")

RECANCEL_EVERY_S = 0.05


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], timeout_s: float = 10.0) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again while one still runs; give
    up (and log the tasks' names) after `timeout_s`. Never raises what the tasks raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            logger.warning("background tasks did not stop: %s", sorted(t.get_name() for t in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY_S, left))

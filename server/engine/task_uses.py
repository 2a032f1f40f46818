"""Per-task request counts, added to the store every few seconds: what a replica's warm start ranks by.

`PrefixCache` counts the requests each task served (`take_uses`); `TaskUses` flushes those counts into
the store (`record_uses`) every `USES_FLUSH_INTERVAL_S` and once more at stop. Both engine backends run
one, so a replica restarted on either warms the tasks its fleet used most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prefix_store.background import stop_tasks
from server.engine.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

USES_FLUSH_INTERVAL_S = 5.0  # how often a replica adds its per-task request counts to the store


class TaskUses:
    def __init__(self, cache: PrefixCache, interval_s: float = USES_FLUSH_INTERVAL_S) -> None:
        self.cache = cache
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="prefixserve-task-uses")

    async def stop(self) -> None:
        """Stop flushing, then add what was served since the last flush. A store that is down must not
        hold up the shutdown: those counts are then lost (they only rank warm starts)."""
        if self._task is None:
            return
        await stop_tasks([self._task])
        self._task = None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.flush(), self.interval_s)

    async def flush(self) -> None:
        """Add the requests served per task since the last flush to the store's counts; on failure they
        are kept for the next flush."""
        uses = self.cache.take_uses()
        if not uses:
            return
        try:
            await self.cache.store.record_uses(uses)
        except Exception as exc:
            logger.debug("recording task uses failed (%s); retried at the next flush", type(exc).__name__)
            for key, n in uses.items():
                self.cache.add_uses(key, n)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

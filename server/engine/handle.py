"""The caller's side of one admitted request: its events, and a way to abort it (no torch here).

`Engine.add_request` returns a `RequestHandle` once the request is admitted (every admission error
has been raised by then). Iterate it (`async for event in handle`) for one `StreamEvent` per
generated token; the last has `finish_reason` set. Errors after admission (`QueueTimeout`,
`RequestFailed`, `EngineStopped`) are raised by the iteration. `abort()` ends the request
("cancelled"): its row is freed at the next step, and an iterator still reading gets the final event.
A handle nobody reads keeps generating until it finishes: abort it when the consumer goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.engine.types import StreamEvent


class RequestHandle:
    """See the module docstring. Event-loop only, like the engine that feeds it."""

    def __init__(
        self,
        request_id: str,
        events: asyncio.Queue[StreamEvent | BaseException],
        on_abort: Callable[[], None],
        prefix_version: int | None = None,
        prefix_variant: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prefix_version = prefix_version  # the version of the task's prefix it runs with
        self.prefix_variant = prefix_variant  # "current", or a split's "primary" / "canary"
        self._events = events
        self._on_abort = on_abort
        self._ended = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._events.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def abort(self) -> None:
        """End the request now (finish_reason "cancelled"); nothing happens if it has ended already."""
        self._on_abort()

    async def aclose(self) -> None:
        """`abort()`, so the handle can stand where an async generator was closed."""
        self.abort()

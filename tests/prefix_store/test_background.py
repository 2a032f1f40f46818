"""`stop_tasks`: a background loop whose client library turns a cancellation into an error of its own
(redis-py can) still stops, and a shutdown awaiting it ends instead of waiting forever."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from prefix_store.background import stop_tasks

pytestmark = pytest.mark.asyncio


class ClientError(Exception):
    pass


class Client:
    """A store client as a library may behave: a cancellation that lands in its first call comes out
    as the library's own error (a race window, hit once)."""

    def __init__(self) -> None:
        self.swallowed = 0

    async def call(self) -> None:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            raise ClientError("connection closed") from None


async def retrying_loop(client: Client) -> None:
    """A probe/poller loop: errors of the store are logged and retried after a pause."""
    while True:
        with contextlib.suppress(ClientError):
            await client.call()
        await asyncio.sleep(0.01)


async def test_a_loop_that_swallows_a_cancellation_is_stopped() -> None:
    client = Client()
    plain = asyncio.create_task(retrying_loop(client))
    await asyncio.sleep(0.05)  # inside the store call
    plain.cancel()
    await asyncio.sleep(0.3)
    assert client.swallowed == 1 and not plain.done()  # the hang a plain cancel + await meets
    plain.cancel()
    await asyncio.wait([plain])

    client = Client()
    task = asyncio.create_task(retrying_loop(client))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await stop_tasks([task], timeout_s=5)
    assert client.swallowed == 1 and task.done() and time.monotonic() - started < 2


async def test_a_task_that_will_not_end_is_given_up_after_the_bound() -> None:
    willing = asyncio.Event()

    async def stubborn() -> None:
        while not willing.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    await stop_tasks([task], timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 2 and not task.done()
    willing.set()  # let it end, so the test's event loop can close
    await stop_tasks([task], timeout_s=5)
    assert task.done()

"""uvicorn's h11 protocol with a deadline for request headers (slowloris and idle connections).

uvicorn closes a keep-alive connection that stays idle `timeout_keep_alive` seconds after a response,
but it arms no timer before the first request, and any byte received cancels the keep-alive timer: a
client that connects and sends nothing, or trickles a header byte every few seconds, holds its
connection (a file descriptor and a slot of `limit_concurrency`) forever. Here every connection must
deliver a complete request line and headers within `timeout_s` of being opened, and again within
`timeout_s` of each response; otherwise it is closed. Bodies are bounded separately (the body limits
of `server.api.admission`), and a request whose headers have arrived is never timed out here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """`H11Protocol` that closes connections whose request headers do not arrive in time."""

    header_timeout_s: float = 10.0  # set by `with_header_timeout`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
            self._cancel_header_timer()
        elif self._header_timer is None:  # a new cycle began here (the rest of a refused body arrived)
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers get the same deadline

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to give `uvicorn.Config(http=...)` for a header deadline of `timeout_s`."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": timeout_s})

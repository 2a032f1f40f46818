"""uvicorn's h11 protocol with deadlines on what one client can hold: its headers, its body, and the
bytes it does not read.

- **Headers** (slowloris, idle connections): uvicorn closes a keep-alive connection that stays idle
  `timeout_keep_alive` seconds after a response, but it arms no timer before the first request, and
  any byte received cancels the keep-alive timer. Here every connection must deliver a complete
  request line and headers within `header_timeout_s` of being opened, and again within
  `header_timeout_s` of each response; otherwise it is closed.
- **Bodies** (trickled uploads): once a request's headers are in, its body must keep coming at
  `min_body_rate` bytes/s on average after a grace of `body_timeout_s`: a body not complete by
  `headers + body_timeout_s + received / min_body_rate` gets its connection closed (the app sees a
  disconnect). After a response sent before the body was read (a 401, 413 or 429 from admission) the
  rest of the body is read and dropped, and must arrive with the same minimum rate after a grace of
  only `refused_body_timeout_s`: a client that sends it promptly keeps its keep-alive connection
  (closing at once would reset the connection under a client still sending), a trickler is cut off
  soon, so refused requests do not hold connection slots.
- **Writes** (a client that never reads a finished stream): bytes that sit unsent (the transport's
  buffer plus the kernel's send queue) with no progress for `write_timeout_s` abort the connection
  with a reset, dropping them (`transport.close()` alone, or a plain close of the socket, would keep
  them for the client for as long as the kernel retries).

One timer per connection, re-armed at most every second, checks the body and write deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.limits import Limits

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # how often a connection's body and write deadlines are checked (at most)


class DeadlineH11Protocol(H11Protocol):
    """`H11Protocol` with header, body and write deadlines (module docstring); built by `with_deadlines`."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_rate: float = 16384.0
    write_timeout_s: float = 30.0
    refused_body_timeout_s: float = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self._body_started: float | None = None  # when the current request's headers were complete
        self._body_bytes = 0
        self._write_buffered = 0  # send-buffer size at the last check
        self._write_stalled_since: float | None = None
        self._refused = False  # the current request was answered before its body was read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        self._arm_watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        was_idle = self.conn.their_state is h11.IDLE
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE:  # a request's headers are complete
            self._cancel_header_timer()
            if was_idle or self._body_started is None:
                self._body_started, self._body_bytes = time.monotonic(), 0
                self._refused = False
            self._body_bytes += len(data)
        elif self._header_timer is None:  # a new cycle began here (the rest of a refused body arrived)
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read (401, 413, 429)
            self._body_started, self._body_bytes = time.monotonic(), 0  # the rest: a short deadline
            self._refused = True
        elif self.conn.their_state is h11.IDLE:
            self._body_started = None
            self._arm_header_timer()  # the next request's headers get the same deadline

    # --- headers -------------------------------------------------------------------------------

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

    # --- bodies and writes ---------------------------------------------------------------------

    def _arm_watch(self) -> None:
        interval = min(
            WATCH_INTERVAL_S,
            self.body_timeout_s / 2,
            self.write_timeout_s / 2,
            self.refused_body_timeout_s / 2,
        )
        self._watch_timer = self.loop.call_later(interval, self._watch)

    def _watch(self) -> None:
        self._watch_timer = None
        now = time.monotonic()
        if self._write_stalled(now):
            logger.warning("closing a connection whose client reads nothing", extra={"client": self.client})
            self._abort()  # drops the unsent bytes; connection_lost follows
            return
        if self._body_late(now) and not self.transport.is_closing():
            logger.warning(
                "closing a connection whose request body is too slow", extra={"client": self.client}
            )
            self.transport.close()
        self._arm_watch()

    def _body_late(self, now: float) -> bool:
        if self._body_started is None or self.conn.their_state is not h11.SEND_BODY:
            return False
        grace = self.refused_body_timeout_s if self._refused else self.body_timeout_s
        allowed = grace + self._body_bytes / self.min_body_rate
        return now - self._body_started > allowed

    def _unsent_bytes(self) -> int:
        """Bytes not yet taken by the client: the transport's buffer plus the kernel's send queue
        (on loopback the kernel alone can hold megabytes of a response)."""
        buffered = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
                buffered += struct.unpack("i", queued)[0]
            except (OSError, ValueError):  # not Linux, or the socket is gone
                pass
        return buffered

    def _abort(self) -> None:
        """Close at once, dropping what the kernel still holds for the client (RST, no lingering)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _write_stalled(self, now: float) -> bool:
        buffered = self._unsent_bytes()
        if buffered == 0 or buffered < self._write_buffered:  # empty, or the client read some
            self._write_stalled_since = None
        elif self._write_stalled_since is None:
            self._write_stalled_since = now
        self._write_buffered = buffered
        return (
            self._write_stalled_since is not None and now - self._write_stalled_since > self.write_timeout_s
        )


def with_deadlines(limits: Limits) -> type[DeadlineH11Protocol]:
    """The protocol class to give `uvicorn.Config(http=...)` for the deadlines of `limits`."""
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {
            "header_timeout_s": limits.timeout_request_header_s,
            "body_timeout_s": limits.timeout_request_body_s,
            "min_body_rate": float(limits.min_request_body_bytes_per_s),
            "write_timeout_s": limits.timeout_write_s,
            "refused_body_timeout_s": limits.timeout_refused_body_s,
        },
    )

"""Graceful shutdown of a real server process (what Kubernetes does to a pod): SIGTERM turns readiness
off and refuses new work while the server keeps answering, lets in-flight generations finish within
`PREFIXSERVE_SHUTDOWN_GRACE_S`, cancels them after it, and exits 0 either way."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.reliability.conftest import ACME, ServerProcess, wait_until

pytestmark = pytest.mark.timeout(300)

# On the 4096-position tiny model: seconds of decoding even on a fast CPU (~2 ms a token), under a minute
# on a loaded 2-core machine.
LONG = 1200
LONGEST = 4000


@dataclass
class StreamReader:
    """Reads one `/v1/generate_stream` in a thread and keeps every SSE event."""

    server: ServerProcess
    max_new_tokens: int
    events: list[dict] = field(default_factory=list)
    error: BaseException | None = None
    status: int | None = None
    ended_at: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": self.max_new_tokens}}
        try:
            with (
                httpx.Client(base_url=self.server.url, timeout=120) as client,
                client.stream("POST", "/v1/generate_stream", json=body, headers=ACME) as r,
            ):
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
        except httpx.HTTPError as exc:  # the connection cut before the last event
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream never ended"


def _drain_checks(server: ServerProcess) -> None:
    """While draining: readiness 503, new generations 503 with Retry-After, liveness still 200."""
    with server.client(timeout=10) as client:

        def not_ready() -> bool:
            return client.get("/ready").status_code == 503

        wait_until(not_ready, 10.0, "/ready to turn 503 after SIGTERM")
        assert "draining" in client.get("/ready").json()["error"]
        refused = client.post("/v1/generate", json={"inputs": "late"}, headers=ACME)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error_type"] == "unavailable" and int(refused.headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200


def test_sigterm_drains_the_in_flight_stream_then_exits_0(spawn_server, long_gpt2_dir):
    server = spawn_server(model_dir=long_gpt2_dir, shutdown_grace_s=120)
    stream = StreamReader(server, LONG)
    wait_until(lambda: len(stream.events) >= 1 or stream.ended_at is not None, 60.0, "the first token")
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    _drain_checks(server)
    assert server.proc is not None and server.proc.poll() is None, "exited before the generation finished"

    stream.join(timeout=180)
    assert stream.status == 200 and stream.error is None, (stream.error, server.log_tail())
    last = stream.events[-1]
    assert "error" not in last, last
    assert last["details"] == {**last["details"], "finish_reason": "length", "generated_tokens": LONG}
    assert len(stream.events) == LONG  # every token arrived
    code = server.wait_exit(timeout=30)
    assert code == 0, server.log_tail()
    assert time.monotonic() - signalled < 150


def test_grace_shorter_than_the_generation_cancels_it_and_exits_0_promptly(spawn_server, long_gpt2_dir):
    grace = 0.5
    server = spawn_server(model_dir=long_gpt2_dir, shutdown_grace_s=grace)
    stream = StreamReader(server, LONGEST)
    wait_until(lambda: len(stream.events) >= 1 or stream.ended_at is not None, 60.0, "the first token")
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = server.wait_exit(timeout=grace + 30)
    exited_after = time.monotonic() - signalled
    assert code == 0, server.log_tail()
    stream.join(timeout=30)
    assert stream.ended_at is not None and stream.ended_at - signalled < grace + 30
    # The stream ended without a completed generation: an in-band error event, or a cut connection.
    finished = [e for e in stream.events if (e.get("details") or {}).get("finish_reason")]
    assert finished == [], finished[-1:]
    assert stream.error is not None or "error" in stream.events[-1], stream.events[-1:]
    assert len(stream.events) < LONGEST
    assert exited_after < grace + 20, (exited_after, server.log_tail())

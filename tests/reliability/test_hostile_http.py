"""Against real server processes: no single HTTP client can stall, bloat or crash the server for
everyone. Stalls are measured as `/health` latency during the attack, memory as the server
process's RSS, connection limits on raw sockets."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.conftest import ACME, HealthProbe, ServerProcess, wait_until

pytestmark = pytest.mark.timeout(300)
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(long_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The 4096-position GPT-2 (prompts up to 4096 x 128 characters pass the size check and get
    tokenised), a JSON body limit that lets an 8 MB prompt through to the prompt check, and short
    connection timeouts."""
    proc = ServerProcess(
        long_gpt2_dir,
        tmp_path_factory.mktemp("hostile-http"),
        max_json_body_bytes=16 << 20,
        timeout_request_header_s=HEADER_TIMEOUT_S,
        timeout_keep_alive_s=HEADER_TIMEOUT_S,
    )
    proc.start()
    yield proc
    proc.stop()


def _json_body(num_chars: int) -> bytes:
    words = ("lorem ipsum dolor sit amet " * (num_chars // 27 + 1))[:num_chars]
    return json.dumps({"inputs": words, "parameters": {"max_new_tokens": 4}}).encode()


def _chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_long_prompts_and_huge_bodies_never_stall_health(server):
    headers = {**ACME, "content-type": "application/json"}
    huge_prompt = _json_body(8_000_000)  # under the 16 MiB body limit: parsed, then refused by length
    longest_allowed = _json_body(4096 * 128 - 100)  # passes the O(1) bound: tokenised, then too long
    body_64mib = b'{"inputs": "' + b"a" * (64 << 20) + b'"}'
    with HealthProbe(server.url) as probe, server.client(timeout=120) as client:
        time.sleep(0.3)
        r = client.post("/v1/generate", content=huge_prompt, headers=headers)
        assert r.status_code == 422 and "characters" in r.json()["error"], r.text[:300]
        r = client.post("/v1/completions", json={"model": "x", "prompt": "a" * 8_000_000}, headers=ACME)
        assert r.status_code == 422, r.text[:300]
        r = client.post("/v1/generate", content=longest_allowed, headers=headers)
        assert r.status_code == 422 and "tokens" in r.json()["error"], r.text[:300]
        r = client.post("/v1/generate", content=body_64mib, headers=headers)
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        r = client.post("/v1/generate", content=_chunks(body_64mib), headers=headers)  # no Content-Length
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        assert client.post("/v1/generate", json={"inputs": "still served"}, headers=ACME).status_code == 200
        time.sleep(0.3)
    assert len(probe.latencies) > 5
    assert probe.worst < HealthProbe.SLO_S, sorted(probe.latencies)[-5:]


def test_unauthenticated_bodies_are_not_read(server):
    body = _json_body(8_000_000)  # 8 MB, under the body limit: only the key check keeps it out
    headers = {"content-type": "application/json"}
    with server.client(timeout=120) as client:
        for _ in range(2):  # warm up whatever a refused request allocates once
            assert client.post("/v1/generate", content=body, headers=headers).status_code == 401
        before = server.rss_kib()
        for i in range(20):
            bad = headers if i % 2 else {**headers, "Authorization": "Bearer not-a-key"}
            content = body if i % 4 < 2 else _chunks(body)
            r = client.post("/v1/generate", content=content, headers=bad)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text[:200]
        r = client.post("/v1/prefixes", files={"artifact": ("p", body)}, data={"task": "t"})
        assert r.status_code == 401
        grown_mib = (server.rss_kib() - before) / 1024
    # 22 bodies of 8 MB: parsing them would have kept well over 100 MB.
    assert grown_mib < 48, f"RSS grew by {grown_mib:.0f} MiB"


def test_malformed_bodies_get_the_documented_answers(server):
    headers = {**ACME, "content-type": "application/json"}
    cases = {  # docs/limits.md, "malformed bodies"
        b'{"inputs": "\xff\xfe"}': (400, "bad_request"),  # not UTF-8
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": (400, "bad_request"),  # too deep
        b'{"inputs": "hi",': (422, "validation"),  # not JSON
        b'["hi"]': (422, "validation"),  # wrong shape
    }
    with server.client() as client:
        for body, (status, error_type) in cases.items():
            r = client.post("/v1/generate", content=body, headers=headers)
            assert (r.status_code, r.json()["error_type"]) == (status, error_type), (body[:20], r.text)


def test_log_lines_cannot_be_forged(server):
    forged = "FORGED INFO prefixserve.access request status=200"  # a task name fits 64 characters
    with server.client() as client:
        r = client.get("/v1/prefixes/evil%0A" + forged.replace(" ", "%20"), headers=ACME)
        assert r.status_code == 422
        files = {"artifact": ("p.safetensors", b"\x00" * 64)}
        r = client.post("/v1/prefixes", data={"task": "evil\r\n" + forged}, files=files, headers=ACME)
        assert r.status_code == 422
    wait_until(lambda: server.log_tail(200).count("evil\\") >= 2, 10, f"access lines\n{server.log_tail()}")
    lines = server.log_path.read_text(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert any("evil\\nFORGED" in line for line in lines)
    assert any("evil\\r\\nFORGED" in line for line in lines)


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True if the server closes `sock` within `within_s` (reads and drops anything it sends)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_idle_and_slowloris_connections_are_closed_and_do_not_block_health(server):
    margin = HEADER_TIMEOUT_S + 6
    # A connection that never sends a byte.
    idle = socket.create_connection(("127.0.0.1", server.port))
    # A keep-alive connection left idle after one request.
    kept = socket.create_connection(("127.0.0.1", server.port))
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    # Slowloris: 30 connections trickling header bytes, each byte well within any per-byte timeout.
    trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]
    closed: set[int] = set()
    with HealthProbe(server.url) as probe:
        start = time.monotonic()
        for sock in trickling:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - start < margin and len(closed) < len(trickling):
            for i, sock in enumerate(trickling):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed.add(i)
            time.sleep(0.3)
    try:
        assert _closed_by_server(idle, margin), "an idle connection stayed open"
        assert _closed_by_server(kept, margin), "an idle keep-alive connection stayed open"
        still_open = [s for i, s in enumerate(trickling) if i not in closed and not _closed_by_server(s, 1)]
        assert not still_open, f"{len(still_open)} slowloris connections stayed open"
        assert probe.worst < HealthProbe.SLO_S, sorted(probe.latencies)[-5:]
    finally:
        for sock in [idle, kept, *trickling]:
            sock.close()

"""Store data a server did not write, against a real server process and a real Redis: spoofed change
messages are hints the server checks against the store (they cannot disable caching or move a task's
version), garbage in `current`/`meta` keys is a 503 with a logged reason (never a 500) and changes
nothing, and the local store's files are private to the server's user (0600 files, 0700 dirs).
"""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, generate, metric_value, upload

pytestmark = pytest.mark.timeout(300)
SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are removed afterwards."""
    prefix = f"trust-data-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def redis_snapshot(client: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the prefix with its serialised value: equal snapshots = an unchanged store. Not the
    per-task request counts (`{prefix}:usage`): serving a request moves them, by design."""
    usage = f"{prefix}:usage".encode()
    return {k: client.dump(k) for k in sorted(client.scan_iter(f"{prefix}:*")) if k != usage}


def device_hits(server) -> float:  # type: ignore[no-untyped-def]
    with server.client() as c:
        text = c.get("/metrics").text
    return metric_value(text, 'prefixserve_prefix_cache_hits_total{tier="device"}') or 0.0


def test_spoofed_change_message_does_not_disable_caching(spawn_server, loaded, key_prefix):
    server = spawn_server(redis_url=SHARED_REDIS, redis_key_prefix=key_prefix)
    r = redis.Redis.from_url(SHARED_REDIS)
    with server.client(timeout=120) as client:
        assert upload(client, "keep", artifact_bytes(loaded.spec, 1)).status_code == 201
        expected = generate(client, "keep").json()["generated_text"]
        before = redis_snapshot(r, key_prefix)
        garbage = [
            {"tenant": "acme", "task": "keep", "version": 10**9},  # the spoof that used to stick
            {"tenant": "acme", "task": "keep", "version": "1"},
            {"tenant": "acme", "task": "keep", "version": 2.5},
            {"tenant": "acme", "task": "keep", "version": 10**30},
            {"tenant": "acme", "task": "keep\n", "version": 1},
        ]
        for message in garbage:
            r.publish(f"{key_prefix}:changes", json.dumps(message))
        r.publish(f"{key_prefix}:changes", b"\xff not json")
        r.publish(f"{key_prefix}:changes", "[" * 100_000)
        for _ in range(3):  # the first may re-read the store; then the task is cached again
            assert generate(client, "keep").json()["generated_text"] == expected
        hits = device_hits(server)
        for _ in range(3):
            response = generate(client, "keep")
            assert response.status_code == 200 and response.json()["generated_text"] == expected
        assert device_hits(server) >= hits + 3, "requests after a spoofed message were not cache hits"
        detail = client.get("/v1/prefixes/keep", headers=ACME).json()
        assert detail["current_version"] == 1
        assert redis_snapshot(r, key_prefix) == before
    r.close()


def test_garbage_in_store_keys_is_503_with_a_logged_reason(spawn_server, loaded, key_prefix):
    server = spawn_server(redis_url=SHARED_REDIS, redis_key_prefix=key_prefix)
    r = redis.Redis.from_url(SHARED_REDIS)
    base = f"{key_prefix}:t:acme:task"
    with server.client(timeout=120) as client:
        for task in ("badcur", "badmeta", "good"):
            assert upload(client, task, artifact_bytes(loaded.spec, 1)).status_code == 201
        r.set(f"{base}:badcur:current", "\u0661" + "9" * 5000)
        r.set(f"{base}:badmeta:v:1:meta", b"\x00{not json")
        before = redis_snapshot(r, key_prefix)
        calls = [
            ("describe badcur", lambda: client.get("/v1/prefixes/badcur", headers=ACME)),
            ("generate badcur", lambda: generate(client, "badcur")),
            ("describe badmeta", lambda: client.get("/v1/prefixes/badmeta", headers=ACME)),
            ("generate badmeta", lambda: generate(client, "badmeta")),
            ("list", lambda: client.get("/v1/prefixes", headers=ACME)),
        ]
        for name, call in calls:
            response = call()
            assert response.status_code == 503, (name, response.status_code, response.text[:300])
            assert response.json()["error_type"] == "unavailable", name
            assert "9999" not in response.text and "not json" not in response.text, name
            assert redis_snapshot(r, key_prefix) == before, name
        assert generate(client, "good").status_code == 200  # other tasks keep working
        assert "corrupt" in server.log_tail(200)
    r.close()


def test_local_store_files_are_private(spawn_server, loaded):
    server = spawn_server()
    with server.client(timeout=120) as client:
        assert upload(client, "keep", artifact_bytes(loaded.spec, 1)).status_code == 201
        assert upload(client, "keep", artifact_bytes(loaded.spec, 2)).status_code == 201
    root = Path(server.env["PREFIXSERVE_LOCAL_STORE_DIR"])
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
    assert modes, "nothing was written"
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o700 if (root / p).is_dir() else 0o600)}
    assert not wrong, wrong
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

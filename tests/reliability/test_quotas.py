"""Per-tenant upload quotas against a real server process: tasks (429), stored bytes (413), upload rate
(429 with Retry-After) and the size of stored `training` metadata (422). A refused upload changes
nothing, and one tenant at its quota does not stop another tenant."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, GLOBEX, upload
from tests.reliability.test_crafted_uploads import store_snapshot

pytestmark = pytest.mark.timeout(300)


def with_training(data: bytes, training: dict[str, Any]) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["training"] = json.dumps(training)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_task_byte_and_metadata_quotas(spawn_server, loaded):
    size = len(artifact_bytes(loaded.spec, 1))
    server = spawn_server(
        tenant_max_tasks=2, tenant_max_stored_bytes=3 * size + size // 2, max_training_metadata_bytes=1024
    )
    with server.client(timeout=120) as client:
        assert upload(client, "one", artifact_bytes(loaded.spec, 1)).status_code == 201
        assert upload(client, "two", artifact_bytes(loaded.spec, 2)).status_code == 201
        before = store_snapshot(server, client)

        r = upload(client, "three", artifact_bytes(loaded.spec, 3))  # a third task
        assert r.status_code == 429 and r.json()["error_type"] == "quota_exceeded", r.text
        assert store_snapshot(server, client) == before

        big_training = with_training(artifact_bytes(loaded.spec, 4), {"notes": "x" * 5000})
        r = upload(client, "one", big_training)
        assert r.status_code == 422 and "training metadata" in r.json()["error"], r.text
        assert store_snapshot(server, client) == before

        # A new version of an existing task is not a new task; it fits in the bytes quota once...
        assert upload(client, "one", artifact_bytes(loaded.spec, 5)).status_code == 201
        before = store_snapshot(server, client)
        # ...but not twice: 4 artifacts would exceed 3.5 artifacts' worth of bytes.
        r = upload(client, "two", artifact_bytes(loaded.spec, 6))
        assert r.status_code == 413 and r.json()["error_type"] == "quota_exceeded", r.text
        assert store_snapshot(server, client) == before

        # Another tenant has quotas of its own.
        assert upload(client, "three", artifact_bytes(loaded.spec, 3), headers=GLOBEX).status_code == 201
        # Deleting a task makes room again.
        assert client.delete("/v1/prefixes/two", headers=ACME).status_code == 204
        assert upload(client, "three", artifact_bytes(loaded.spec, 3)).status_code == 201


def test_upload_rate_quota(spawn_server, loaded):
    # 1 per minute (`tenant_upload_rps`): a fixed 60-s window, so of three uploads made within a minute at most two (one at
    # each side of a window boundary) can pass, whatever the timing.
    server = spawn_server(tenant_upload_rps=1 / 60)
    with server.client(timeout=120) as client:
        responses = [upload(client, "rated", artifact_bytes(loaded.spec, i)) for i in range(3)]
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) <= 2 and set(statuses) <= {201, 429}, statuses
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        versions = client.get("/v1/prefixes/rated", headers=ACME).json()["versions"]
        assert len(versions) == statuses.count(201)  # refused uploads stored nothing
        assert upload(client, "other", artifact_bytes(loaded.spec, 9), headers=GLOBEX).status_code == 201

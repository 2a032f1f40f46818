"""Canary splits across two server processes sharing one Redis: every replica sends a key to the same
version, and a promote through one replica reaches the other."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from redis import Redis

from tests.api.conftest import REDIS_URL, artifact_bytes
from tests.reliability.conftest import ACME, START_TIMEOUT_S, upload, wait_until


@pytest.fixture
def key_prefix() -> Iterator[str]:
    prefix = f"rel-canary-{uuid.uuid4().hex[:10]}"
    yield prefix
    admin = Redis.from_url(REDIS_URL)
    keys = list(admin.scan_iter(match=f"{prefix}:*"))
    if keys:
        admin.delete(*keys)
    admin.close()


async def versions(url: str, keys: list[str]) -> list[int]:
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(key: str) -> int:
            body = {"task": "sum", "inputs": "Hi", "parameters": {"max_new_tokens": 1, "details": True}}
            async with gate:
                r = await client.post("/v1/generate", json=body, headers={**ACME, "X-Route-Key": key})
            assert r.status_code == 200, r.text
            return int(r.json()["details"]["prefix_version"])

        return list(await asyncio.gather(*(one(k) for k in keys)))


def test_two_replicas_split_alike_and_follow_a_promote(spawn_server, loaded, key_prefix) -> None:
    settings = {"redis_url": REDIS_URL, "redis_key_prefix": key_prefix}
    servers = [spawn_server(wait_ready=False, **settings) for _ in range(2)]
    for s in servers:  # both import torch at once: allow twice one server's start-up time
        wait_until(s.ready_or_dead, 2 * START_TIMEOUT_S, f"server /ready\n{s.log_tail()}", 0.2)
    first, second = servers
    with first.client() as c:
        for seed in (1, 2):
            assert upload(c, "sum", artifact_bytes(loaded.spec, seed)).status_code == 201
        r = c.put("/v1/prefixes/sum/traffic", json={"weights": {"2": 10, "1": 90}}, headers=ACME)
        assert r.status_code == 200, r.text
    keys = [f"user-{i}" for i in range(300)]
    on_first = asyncio.run(versions(first.url, keys))
    on_second = asyncio.run(versions(second.url, keys))
    assert on_first == on_second and 0.04 <= on_first.count(2) / len(keys) <= 0.16
    with second.client() as c:
        assert c.post("/v1/prefixes/sum/promote", json={"version": 2}, headers=ACME).status_code == 200
    wait_until(
        lambda: set(asyncio.run(versions(first.url, keys[:20]))) == {2}, 30, "the promote on replica 1"
    )
    assert set(asyncio.run(versions(first.url, keys))) == {2}

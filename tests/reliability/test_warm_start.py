"""Warm replicas: a restarted server loads the most used tasks before it reports ready, and its first
requests for them read nothing from the store (counted by `prefixserve_prefix_store_reads_total`).

Real processes: a redis-server, a server that serves a skewed mix of tasks (its counts reach the
store), then a second server on the same store, as a replacement replica would start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from modeling.models import load_model
from tests.api.conftest import artifact_bytes
from tests.processes import RedisProcess
from tests.reliability.conftest import generate, metric_value, upload

USES = {"hot": 5, "warm": 3, "mild": 2, "cold": 1}  # requests per task on the first server


def store_reads(client: httpx.Client, reason: str) -> float:
    value = metric_value(
        client.get("/metrics").text, f'prefixserve_prefix_store_reads_total{{reason="{reason}"}}'
    )
    assert value is not None
    return value


def test_restarted_replica_serves_its_warm_tasks_without_a_store_read(
    persistent_redis: RedisProcess, spawn_server: Callable[..., Any], tiny_gpt2_dir: Path
) -> None:
    spec = load_model(str(tiny_gpt2_dir), device="cpu", dtype="float32").spec
    settings = {"redis_url": persistent_redis.url, "warm_start_tasks": 3}
    first = spawn_server(**settings)
    with first.client() as client:
        assert store_reads(client, "warm") == 0  # an empty store: nothing to warm
        for seed, (task, n) in enumerate(USES.items()):
            assert upload(client, task, artifact_bytes(spec, seed)).status_code == 201
            for _ in range(n):
                assert generate(client, task).status_code == 200
    first.stop()  # a graceful stop adds the last counts to the store

    second = spawn_server(**settings)  # ready = warm start done
    with second.client() as client:
        assert store_reads(client, "warm") == 3  # the three most used tasks, before readiness
        assert (
            metric_value(client.get("/metrics").text, 'prefixserve_warm_start_tasks_total{outcome="loaded"}')
            == 3
        )
        for task in ("hot", "warm", "mild"):
            assert generate(client, task).status_code == 200
        assert store_reads(client, "request") == 0  # no request paid a store read
        assert generate(client, "cold").status_code == 200  # not warmed: its first request reads
        assert store_reads(client, "request") == 1


def test_warm_start_is_skipped_when_the_store_is_down_and_the_replica_still_gets_ready(
    persistent_redis: RedisProcess, spawn_server: Callable[..., Any]
) -> None:
    persistent_redis.stop()
    server = spawn_server(redis_url=persistent_redis.url, warm_start_tasks=3, warm_start_timeout_s=5)
    with server.client() as client:
        assert client.get("/ready").status_code == 200
        assert store_reads(client, "warm") == 0

"""Limits and failure modes: body size, queue, tenant rate/concurrency, store outage, draining."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from prefix_store.factory import make_store
from server.api import start_draining
from server.api.errors import RateLimited
from server.engine import EngineConfig
from server.engine.fair_queue import FairQueueConfig
from server.limits import Limits
from tests.api.conftest import ACME, DEAD_REDIS_URL, GLOBEX, REDIS_URL, wait_for

LONG = {"max_new_tokens": 150}  # long enough to still be running while we probe


async def test_body_size_limit_413(make_api):
    api = await make_api(max_body_bytes=4096)
    big = b'{"inputs": "' + b"a" * 10_000 + b'"}'
    r = await api.client.post(
        "/v1/generate", content=big, headers={**ACME, "content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert r.headers["x-request-id"]

    async def chunks():  # no Content-Length (chunked): the streamed byte count must catch it
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = await api.client.post(
        "/v1/generate", content=chunks(), headers={**ACME, "content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    r = await api.client.post("/v1/generate", json={"inputs": "small"}, headers=ACME)
    assert r.status_code == 200


async def test_queue_full_is_429_with_retry_after(make_api):
    api = await make_api(engine_config=EngineConfig(Limits(max_batch_size=1, max_waiting=1)))
    running = asyncio.create_task(api.generate("a", **LONG))
    await wait_for(lambda: api.engine.num_running == 1, what="a running request")
    waiting = asyncio.create_task(api.generate("b", max_new_tokens=2))
    await wait_for(lambda: api.engine.num_waiting == 1, what="a waiting request")
    r = await api.generate("c", max_new_tokens=2)
    assert r.status_code == 429, r.text
    assert r.json()["error_type"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert (await running).status_code == 200 and (await waiting).status_code == 200


async def test_an_early_429_says_which_queue_bound_was_met(make_api):
    fair = FairQueueConfig(tenant_max_waiting={"acme": 1})
    api = await make_api(engine_config=EngineConfig(Limits(max_batch_size=1, max_waiting=2), fair_queue=fair))
    running = asyncio.create_task(api.generate("a", **LONG))
    await wait_for(lambda: api.engine.num_running == 1, what="a running request")
    waiting = [asyncio.create_task(api.generate("b", max_new_tokens=2))]
    await wait_for(lambda: api.engine.num_waiting == 1, what="acme's waiting request")
    own = await api.generate("c", max_new_tokens=2)  # acme's own bound (1) is met, the queue has room
    assert own.status_code == 429 and "tenant 'acme'" in own.json()["error"], own.text
    waiting.append(asyncio.create_task(api.generate("d", headers=GLOBEX, max_new_tokens=2)))
    await wait_for(lambda: api.engine.num_waiting == 2, what="globex's waiting request")
    full = await api.generate("e", headers=GLOBEX, max_new_tokens=2)  # the server's bound (2) is met
    assert full.status_code == 429 and "server's queue is full" in full.json()["error"], full.text
    assert (await running).status_code == 200
    assert [(await w).status_code for w in waiting] == [200, 200]


async def _burst(api, n: int, headers=ACME) -> list:
    return [await api.generate("x", headers=headers, max_new_tokens=1) for _ in range(n)]


async def test_tenant_rate_limit_in_process(make_api):
    api = await make_api(tenant_rps=2)
    responses = await _burst(api, 6)
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    assert limited[0].json()["error_type"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1
    # Another tenant has its own budget.
    assert (await api.generate("x", headers=GLOBEX, max_new_tokens=1)).status_code == 200


async def test_tenant_rate_limit_is_shared_across_replicas_through_redis(make_api):
    shared = "pstest-shared-rl"
    one = await make_api(redis=True, tenant_rps=3, redis_key_prefix=shared)
    two = await make_api(redis=True, tenant_rps=3, redis_key_prefix=shared)
    statuses = []
    for i in range(8):  # alternate replicas: each alone would allow 3/s, together only 3/s
        statuses.append((await (one if i % 2 else two).generate("x", max_new_tokens=1)).status_code)
    # 8 quick requests span at most 2 one-second windows: at most 6 pass in total.
    assert statuses.count(429) >= 2, statuses


async def test_tenant_concurrency_limit(make_api, loaded):
    api = await make_api(tenant_max_concurrent=1)
    first = asyncio.create_task(api.generate("a", **LONG))
    await wait_for(lambda: api.engine.num_running == 1, what="a running request")
    r = await api.generate("b", max_new_tokens=1)
    assert r.status_code == 429 and r.json()["error_type"] == "rate_limited" and r.headers["retry-after"]
    assert (await api.generate("b", headers=GLOBEX, max_new_tokens=1)).status_code == 200
    assert (await first).status_code == 200
    # The slot was released: the tenant can generate again (streams and errors release it too).
    assert (
        await api.client.post("/v1/generate_stream", json={"inputs": "s"}, headers=ACME)
    ).status_code == 200
    assert (await api.generate("x", task="missing")).status_code == 404
    assert (await api.generate("c", max_new_tokens=1)).status_code == 200


async def test_redis_concurrency_limit(make_api):
    api = await make_api(redis=True, tenant_max_concurrent=1)
    first = asyncio.create_task(api.generate("a", **LONG))
    await wait_for(lambda: api.engine.num_running == 1, what="a running request")
    assert (await api.generate("b", max_new_tokens=1)).status_code == 429
    assert (await first).status_code == 200
    assert (await api.generate("c", max_new_tokens=1)).status_code == 200


async def test_store_unavailable_is_503_and_health_stays_up(make_api, tmp_path):
    store = make_store(DEAD_REDIS_URL, tmp_path, "pstest-dead", socket_timeout=0.2, retries=0)
    api = await make_api(store=store)
    r = await api.generate("x", task="uncached-task")
    assert r.status_code == 503, r.text
    assert r.json()["error_type"] == "unavailable" and int(r.headers["retry-after"]) >= 1
    listing = await api.client.get("/v1/prefixes", headers=ACME)
    assert listing.status_code == 503 and listing.headers["retry-after"]
    upload = await api.upload("t", b"\x00" * 16)
    assert upload.status_code == 422  # validation happens before the store is touched
    health = await api.client.get("/health")
    assert health.status_code == 200
    assert (await api.generate("x")).status_code == 200  # the bare model needs no store
    metrics = (await api.client.get("/metrics")).text
    assert "prefixserve_store_up 0.0" in metrics
    assert 'prefixserve_store_errors_total{operation="list_tasks"}' in metrics


async def test_draining_refuses_new_work_and_finishes_in_flight(make_api):
    api = await make_api()
    assert (await api.client.get("/ready")).status_code == 200
    in_flight = asyncio.create_task(api.generate("a", max_new_tokens=200))
    await wait_for(lambda: api.engine.num_running == 1, what="a running request")
    start_draining(api.app)
    ready = await api.client.get("/ready")
    assert ready.status_code == 503 and "draining" in ready.json()["error"]
    refused = await api.generate("b")
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert (await api.client.get("/health")).status_code == 200
    done = await in_flight
    assert done.status_code == 200 and done.json()["details"]["generated_tokens"] == 200


async def test_dead_engine_turns_readiness_off_and_calls_on_fatal(make_api):
    fatal = asyncio.Event()
    api = await make_api(on_fatal=fatal.set)
    api.engine.healthy = False  # what the engine loop does when it dies
    await asyncio.wait_for(fatal.wait(), timeout=5)
    assert (await api.client.get("/ready")).status_code == 503
    api.engine.healthy = True  # let teardown drain normally


def _redis_limiter(**config):  # type: ignore[no-untyped-def]
    from server.api.ratelimit import LimitConfig, RedisLimiter

    prefix = f"pstest-{uuid.uuid4().hex[:10]}"
    return RedisLimiter(
        REDIS_URL, LimitConfig(**{"max_concurrent": 0, "rps": 0.0, **config}), key_prefix=prefix
    ), prefix


async def test_redis_limiter_falls_back_only_when_redis_is_down():
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    limiter, _ = _redis_limiter(max_concurrent=1)
    try:

        async def fails(exc: BaseException):  # type: ignore[no-untyped-def]
            raise exc

        # A bug or an unexpected Redis reply surfaces instead of switching to per-replica limits.
        for bug in (ValueError("bug"), ResponseError("WRONGTYPE")):
            limiter._acquire_redis = lambda tenant, bug=bug: fails(bug)  # type: ignore[method-assign]
            with pytest.raises(type(bug)):
                await limiter.acquire("acme")
            assert limiter._broken_until == 0.0
        # An unreachable Redis falls back to the local counters (which still enforce the limit).
        limiter._acquire_redis = lambda tenant: fails(RedisConnectionError("down"))  # type: ignore[method-assign]
        lease = await limiter.acquire("acme")
        assert limiter._broken_until > 0.0
        with pytest.raises(RateLimited):
            await limiter.acquire("acme")
        await lease.release()
    finally:
        await limiter.close()


async def test_redis_limiter_cancelled_acquire_does_not_leak_its_lease():
    from redis.asyncio import Redis

    limiter, prefix = _redis_limiter(max_concurrent=1)
    key = f"{prefix}:rl:conc:acme"
    redis = Redis.from_url(REDIS_URL, socket_timeout=2)
    script, landed, reply = limiter._lease, asyncio.Event(), asyncio.Event()

    async def slow_reply(**kwargs):  # type: ignore[no-untyped-def]
        result = await script(**kwargs)  # the lease is in Redis...
        landed.set()
        await reply.wait()  # ...but the reply has not reached the caller yet
        return result

    limiter._lease = slow_reply  # type: ignore[method-assign]
    try:
        acquiring = asyncio.create_task(limiter.acquire("acme"))
        await asyncio.wait_for(landed.wait(), timeout=5)
        assert await redis.zcard(key) == 1
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
        reply.set()
        deadline = asyncio.get_running_loop().time() + 5
        while await redis.zcard(key) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert await redis.zcard(key) == 0, "the cancelled acquire leaked its concurrency slot"
        limiter._lease = script  # type: ignore[method-assign]
        lease = await limiter.acquire("acme")  # the slot is free again
        await lease.release()
    finally:
        await limiter.close()
        await redis.delete(key)
        await redis.aclose()

"""Canary rollouts through the API: traffic weights over a task's versions, pinned per key, promote /
rollback / delete under traffic; the real engine, the local store and Redis (two replicas)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from tests.api.conftest import ACME, ACME_GEN, GLOBEX, Api, artifact_bytes


async def two_versions(api: Api, task: str = "sum") -> None:
    for seed in (1, 2):
        r = await api.upload(task, artifact_bytes(api.engine.loaded.spec, seed))
        assert r.status_code == 201, r.text


async def served_version(api: Api, key: str, task: str = "sum", header: str = "X-Route-Key") -> int:
    body = {"task": task, "inputs": "Hi", "parameters": {"max_new_tokens": 1, "details": True}}
    r = await api.client.post("/v1/generate", json=body, headers={**ACME_GEN, header: key})
    assert r.status_code == 200, r.text
    return int(r.json()["details"]["prefix_version"])


async def versions_for(api: Api, keys: list[str], concurrency: int = 16) -> list[int]:
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str) -> int:
        async with gate:
            return await served_version(api, key)

    return list(await asyncio.gather(*(one(k) for k in keys)))


async def test_a_ten_percent_canary_serves_ten_percent_and_pins_each_key(make_api) -> None:
    api = await make_api()
    await two_versions(api)
    r = await api.client.put("/v1/prefixes/sum/traffic", json={"weights": {"2": 10, "1": 90}}, headers=ACME)
    assert r.status_code == 200 and r.json() == {"weights": {"1": 90, "2": 10}}
    keys = [f"user-{i}" for i in range(1000)]
    got = await versions_for(api, keys)
    share = Counter(got)[2] / len(got)
    assert 0.07 <= share <= 0.13, share
    # The same key always gets the same version (and the request id pins without a key).
    again = await versions_for(api, keys[:100])
    assert again == got[:100]
    pinned = {await served_version(api, "req-42", header="X-Request-Id") for _ in range(5)}
    assert len(pinned) == 1
    metrics = (await api.client.get("/metrics")).text
    assert 'variant="canary"' in metrics and 'variant="primary"' in metrics
    detail = (await api.client.get("/v1/prefixes/sum/traffic", headers=ACME_GEN)).json()
    assert detail == {"weights": {"1": 90, "2": 10}}


async def test_bad_splits_get_4xx_and_change_nothing(make_api) -> None:
    api = await make_api()
    await two_versions(api)
    put = api.client.put
    assert (
        await put("/v1/prefixes/sum/traffic", json={"weights": {"2": 10, "1": 80}}, headers=ACME)
    ).status_code == 422
    assert (
        await put("/v1/prefixes/sum/traffic", json={"weights": {"9": 100}}, headers=ACME)
    ).status_code == 404
    assert (
        await put("/v1/prefixes/nope/traffic", json={"weights": {"1": 100}}, headers=ACME)
    ).status_code == 404
    assert (
        await put("/v1/prefixes/sum/traffic", json={"weights": {"1": 100}}, headers=ACME_GEN)
    ).status_code == 403
    assert (
        await put("/v1/prefixes/sum/traffic", json={"weights": {"1": 100}}, headers=GLOBEX)
    ).status_code == 404
    r = await api.client.post("/v1/prefixes/sum/promote", json={"version": 1}, headers=ACME_GEN)
    assert r.status_code == 403
    assert (await api.client.get("/v1/prefixes/sum/traffic", headers=ACME)).json() == {"weights": {}}
    r = await api.client.post(
        "/v1/generate", json={"task": "sum", "inputs": "x"}, headers={**ACME, "X-Priority": "urgent"}
    )
    assert r.status_code == 422 and "X-Priority" in r.text


async def test_promote_rollback_and_delete_under_traffic_lose_no_request(make_api) -> None:
    api = await make_api()
    await two_versions(api)
    statuses: Counter[int] = Counter()
    versions: Counter[int] = Counter()
    stop = asyncio.Event()

    async def client_loop(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"task": "sum", "inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}}
            r = await api.client.post(
                "/v1/generate", json=body, headers={**ACME_GEN, "X-Route-Key": f"{i}-{n}"}
            )
            statuses[r.status_code] += 1
            if r.status_code == 200:
                versions[r.json()["details"]["prefix_version"]] += 1

    async def answers(n: int) -> None:  # let traffic run: n more answers (not a fixed time)
        target = statuses.total() + n
        while statuses.total() < target:
            await asyncio.sleep(0.01)

    async def step(method: str, path: str, **kw: object) -> None:
        await answers(6)
        r = await api.client.request(method, path, headers=ACME, **kw)  # type: ignore[arg-type]
        assert r.status_code < 300, r.text

    clients = [asyncio.create_task(client_loop(i)) for i in range(6)]
    await step("PUT", "/v1/prefixes/sum/traffic", json={"weights": {"2": 50, "1": 50}})
    await step("POST", "/v1/prefixes/sum/promote", json={"version": 2})
    await step("PUT", "/v1/prefixes/sum/traffic", json={"weights": {"1": 30, "2": 70}})
    await step("POST", "/v1/prefixes/sum/rollback", json={"version": 1})
    await step("DELETE", "/v1/prefixes/sum")
    while statuses[404] < 6:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*clients)
    # Every request got an answer: served (by one of the two versions) or, after the delete, 404.
    assert set(statuses) <= {200, 404} and statuses[200] >= 30, statuses
    assert set(versions) == {1, 2}


async def test_two_redis_replicas_split_alike(make_api) -> None:
    prefix = f"pstest-{uuid.uuid4().hex[:10]}"
    first = await make_api(redis=True, redis_key_prefix=prefix)
    second = await make_api(redis=True, redis_key_prefix=prefix)
    await two_versions(first)
    r = await first.client.put("/v1/prefixes/sum/traffic", json={"weights": {"2": 10, "1": 90}}, headers=ACME)
    assert r.status_code == 200
    keys = [f"user-{i}" for i in range(200)]
    one, two = await versions_for(first, keys), await versions_for(second, keys)
    assert one == two and set(one) == {1, 2}
    # A promote through one replica reaches the other (pub/sub): every key gets v2 there.
    r = await first.client.post("/v1/prefixes/sum/promote", json={"version": 2}, headers=ACME)
    assert r.status_code == 200
    for _ in range(200):
        if set(await versions_for(second, keys[:20])) == {2}:
            break
        await asyncio.sleep(0.05)
    assert set(await versions_for(second, keys)) == {2}

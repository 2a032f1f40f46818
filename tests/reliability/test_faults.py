"""Faults: Redis stopped and restarted under traffic, clients that vanish mid-stream, overload, one
request's failure, and the engine loop dying. Real server processes and a real redis-server, except
where a fault has to be injected into the model runner (then the app runs in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import (
    ACME,
    GLOBEX,
    TEST_ENGINE,
    generate,
    metric_value,
    upload,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


def test_redis_outage_keeps_cached_tasks_serving_and_recovers_without_restart(
    spawn_server, persistent_redis, loaded
):
    # A Redis that keeps its data across the restart (AOF), as in production: one that comes back empty
    # has lost every task, and the server then rightly answers 404 for the tasks it had cached.
    redis_process = persistent_redis
    server = spawn_server(redis_url=redis_process.url, redis_key_prefix="rel-outage")
    spec = loaded.spec
    with server.client(timeout=30) as client:
        assert upload(client, "cached", artifact_bytes(spec, 1)).status_code == 201
        assert upload(client, "uncached", artifact_bytes(spec, 2)).status_code == 201
        expected = generate(client, "cached").json()["generated_text"]  # now in the prefix cache

        # Steady traffic on the cached task across the outage and the restart.
        stop = threading.Event()
        statuses: list[int] = []

        def traffic() -> None:
            with server.client(timeout=30) as c:
                while not stop.is_set():
                    r = generate(c, "cached")
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        assert r.json()["generated_text"] == expected
                    time.sleep(0.05)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        try:
            redis_process.stop()
            started = time.monotonic()
            r = generate(client, "uncached")
            assert r.status_code == 503, r.text
            assert r.json()["error_type"] == "unavailable" and int(r.headers["retry-after"]) >= 1
            assert time.monotonic() - started < 20, "a store outage must fail fast, not hang"
            r = upload(client, "during-outage", artifact_bytes(spec, 3))
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert client.get("/v1/prefixes", headers=ACME).status_code == 503
            assert client.get("/health").status_code == 200
            assert client.get("/ready").status_code == 200  # cached tasks and the base model still serve
            assert generate(client, None).status_code == 200
            assert generate(client, "cached").status_code == 200
            n_during = len(statuses)
            assert "prefixserve_store_up 0.0" in client.get("/metrics").text

            redis_process.start()  # same port, same data

            def upload_works() -> bool:
                return upload(client, "after-restart", artifact_bytes(spec, 4)).status_code == 201

            wait_until(upload_works, 30.0, "uploads to work again after Redis restarted", interval=0.5)
            r = generate(client, "after-restart")
            assert r.status_code == 200, r.text
            assert r.json()["generated_text"] != generate(client, None).json()["generated_text"]
            listing = client.get("/v1/prefixes", headers=ACME).json()
            assert "after-restart" in [i["task"] for i in listing["items"]]
            assert "prefixserve_store_up 1.0" in client.get("/metrics").text
        finally:
            stop.set()
            worker.join(timeout=60)
        assert statuses and set(statuses) == {200}, statuses
        assert len(statuses) > n_during or n_during > 0
        assert server.proc is not None and server.proc.poll() is None  # never restarted


def test_overload_queue_timeout_and_disconnect(spawn_server, long_gpt2_dir):
    """max_batch_size=1, max_waiting=1: one running, one waiting, everything else 429 at once."""
    server = spawn_server(model_dir=long_gpt2_dir, max_batch_size=1, max_waiting=1, queue_timeout_s=2)
    long_body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4000}}  # seconds, even on a fast CPU
    with server.client(timeout=60) as client, ThreadPoolExecutor(max_workers=12) as pool:

        def gauge(name: str) -> float | None:
            return metric_value(client.get("/metrics").text, name)

        def timed_generate(headers: dict[str, str] = ACME) -> tuple[httpx.Response, float]:
            with server.client(timeout=60) as c:
                t0 = time.monotonic()
                r = generate(c, None, headers, max_new_tokens=2)
                return r, time.monotonic() - t0

        with (
            httpx.Client(base_url=server.url, timeout=120) as streamer,
            streamer.stream("POST", "/v1/generate_stream", json=long_body, headers=ACME) as running,
        ):
            assert running.status_code == 200
            lines = running.iter_lines()  # kept referenced: a collected iterator closes the stream
            while not next(lines).startswith("data:"):
                pass
            queued = pool.submit(timed_generate)
            wait_until(lambda: gauge("prefixserve_requests_waiting") == 1.0, 20.0, "one waiting request")

            burst = list(pool.map(lambda i: timed_generate(GLOBEX if i % 2 else ACME), range(12)))
            assert [r.status_code for r, _ in burst] == [429] * 12, [r.text for r, _ in burst]
            assert max(t for _, t in burst) < 1.0, sorted(t for _, t in burst)[-3:]
            assert all(
                r.json()["error_type"] == "overloaded" and int(r.headers["retry-after"]) >= 1
                for r, _ in burst
            )
            assert gauge("prefixserve_requests_running") == 1.0
            assert gauge("prefixserve_kv_cache_usage_ratio") <= 1.0

            # The queued request does not wait forever: after queue_timeout_s it gets a clear error.
            timed_out, waited = queued.result(timeout=60)
            assert timed_out.status_code == 503, timed_out.text
            assert timed_out.json()["error_type"] == "overloaded" and "queue" in timed_out.json()["error"]
            assert timed_out.headers["retry-after"] and 1.5 < waited < 30, waited

            # The running stream's client goes away mid-stream: its batch slot is freed, and the request
            # queued behind it is admitted and finishes.
            admitted = pool.submit(timed_generate)
            wait_until(lambda: gauge("prefixserve_requests_waiting") == 1.0, 20.0, "a waiting request")
            running.close()
            done, _ = admitted.result(timeout=60)
            assert done.status_code == 200, done.text
        wait_until(lambda: gauge("prefixserve_requests_running") == 0.0, 20.0, "the running gauge to drop")
        assert client.get("/ready").status_code == 200
        assert generate(client, None).status_code == 200


async def test_one_request_failing_fails_alone(make_api, loaded):
    api = await make_api()
    poison = loaded.tokenizer.encode(" poisoned request", add_special_tokens=False)
    _fail_requests_for(api, poison)
    alone = (await api.generate("Hello there", max_new_tokens=6)).json()["generated_text"]
    results = await asyncio.gather(
        *(api.generate("Hello there", max_new_tokens=6) for _ in range(3)),
        api.generate(" poisoned request", max_new_tokens=6),
        api.client.post(
            "/v1/generate_stream", json={"inputs": " poisoned request"}, headers=ACME
        ),  # streamed: still a proper status, the failure happens before the first token
    )
    for r in results[:3]:
        assert r.status_code == 200 and r.json()["generated_text"] == alone, r.text
    for r in results[3:]:
        assert r.status_code == 424, r.text
        assert r.json()["error_type"] == "generation" and "generation failed" in r.json()["error"]
    assert (await api.client.get("/ready")).status_code == 200
    assert (await api.generate("Hello there", max_new_tokens=6)).json()["generated_text"] == alone


async def test_engine_loop_crash_turns_readiness_off_and_takes_the_exit_path(make_api):
    fatal = asyncio.Event()
    api = await make_api(on_fatal=fatal.set)
    _kill_the_model(api)  # every step now fails (native) or vLLM's engine core is dead (vLLM)
    r = await api.generate("x", max_new_tokens=5)
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable", r.text
    await asyncio.wait_for(fatal.wait(), timeout=10)  # main's on_fatal: exit status 1
    ready = await api.client.get("/ready")
    assert ready.status_code == 503, ready.text
    later = await api.generate("y", max_new_tokens=2)
    assert later.status_code == 503
    api.engine.healthy = True  # let the fixture's teardown stop it normally


def _fail_requests_for(api, poison: list[int]) -> None:
    """The model fails on any request whose prompt is `poison`: the native runner's step raises for a
    batch holding it; on vLLM, vLLM raises for that one request (as it does for one it rejects)."""
    if TEST_ENGINE == "vllm":
        api.engine.llm = _FailingVllm(api.engine.llm, poison=poison)
        return
    real_step = api.engine.runner.step

    def step(tokens, items):  # a request the runner cannot handle, recognised by its prompt
        if any(list(item.input_ids) == list(poison) for item in items):
            raise RuntimeError("injected: this request breaks the model runner")
        return real_step(tokens, items)

    api.engine.runner.step = step


def _kill_the_model(api) -> None:
    """Native: every decode step raises (a lost device), so the engine loop dies. vLLM: its engine core
    is dead (the in-process view of a killed core; test_vllm_engine_core.py kills a real one)."""
    if TEST_ENGINE == "vllm":
        api.engine.llm = _FailingVllm(api.engine.llm, dead=True)
        return
    real_step = api.engine.runner.step

    def step(tokens, items):
        if tokens:
            raise RuntimeError("injected: device lost")
        return real_step(tokens, items)

    api.engine.runner.step = step


class _FailingVllm:
    """vLLM's `AsyncLLM` as one engine sees it (the shared core itself stays healthy): a `poison` prompt
    raises inside `generate`, or (`dead`) every `generate` raises vLLM's EngineDeadError and `errored`
    turns true, as after its engine core process died."""

    def __init__(self, llm, poison: list[int] | None = None, dead: bool = False) -> None:
        self._llm, self._poison, self._dead, self._died = llm, poison, dead, False

    def __getattr__(self, name: str):
        return getattr(self._llm, name)

    @property
    def errored(self) -> bool:
        return self._died or self._llm.errored

    @property
    def dead_error(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        return EngineDeadError() if self._died else self._llm.dead_error

    async def generate(self, prompt, *args, **kwargs):
        from vllm.v1.engine.exceptions import EngineDeadError

        ids = list(prompt["prompt_token_ids"])
        if self._poison and ids[-len(self._poison) :] == self._poison:
            raise ValueError("injected: vLLM cannot run this request")
        if self._dead:
            self._died = True
            raise EngineDeadError()
        async for output in self._llm.generate(prompt, *args, **kwargs):
            yield output


def test_engine_loop_crash_exits_the_process_non_zero(spawn_server):
    script = Path(__file__).with_name("crashing_server.py")
    server = spawn_server(argv=[sys.executable, str(script)], shutdown_grace_s=5)
    with server.client(timeout=30) as client:
        assert client.get("/ready").status_code == 200
        r = generate(client, None, max_new_tokens=5)
        assert r.status_code == 503, r.text
        with contextlib.suppress(httpx.TransportError):  # between crash and exit, readiness says no
            assert client.get("/ready").status_code == 503
    code = server.wait_exit(timeout=60)
    assert code not in (0, None) and code > 0, (code, server.log_tail())
    assert "engine loop died" in server.log_tail(200)

"""Store data a server did not write, and a store that stops answering, against a real server process
and a real Redis or local store: spoofed change messages are hints the server checks against the
store (they cannot disable caching or move a task's version); garbage in one task's `current`/`meta`
/`split` or a damaged blob is a 503 with a logged reason for that task alone (never a 500): listings
skip it, other uploads work, a new version repairs it; a hung Redis (SIGSTOP) is a 503 within the
store deadline; churning task names leaves no memory, files or use counts behind; and the local
store's files are private to the server's user (0600 files, 0700 dirs).

While a broken task is hammered and while Redis hangs, another tenant (globex) generating with its
own cached task is measured from its own process: its latency stays within 2x of its quiet value
and `/health` answers in under 100 ms at the median (`assert_victim_unaffected`).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.api.conftest import artifact_bytes
from tests.processes import RedisProcess, free_port
from tests.reliability.conftest import (
    ACME,
    GLOBEX,
    Victim,
    assert_victim_unaffected,
    generate,
    metric_value,
    quiet_generation_s,
    upload,
    wait_until,
)

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
        ]
        for name, call in calls:
            response = call()
            assert response.status_code == 503, (name, response.status_code, response.text[:300])
            assert response.json()["error_type"] == "unavailable", name
            # No stored bytes echoed (a run of 9s that a request id's hex cannot hold by chance).
            assert "9" * 20 not in response.text and "not json" not in response.text, name
            assert redis_snapshot(r, key_prefix) == before, name
        assert generate(client, "good").status_code == 200  # other tasks keep working
        listing = client.get("/v1/prefixes", headers=ACME)  # the corrupt tasks are left out
        assert listing.status_code == 200 and [i["task"] for i in listing.json()["items"]] == ["good"]
        assert redis_snapshot(r, key_prefix) == before
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


class StoredData:
    """Writes into one tenant's stored data behind the server's back (bit rot, a hand edit), for either
    backend: `part` is "current", "split", "meta:N" or "blob:N"."""

    def __init__(self, server, key_prefix: str | None) -> None:  # type: ignore[no-untyped-def]
        self.root = Path(server.env["PREFIXSERVE_LOCAL_STORE_DIR"]) / "acme"
        self.key_prefix = key_prefix
        self.redis = redis.Redis.from_url(SHARED_REDIS) if key_prefix else None

    def _path_or_key(self, task: str, part: str) -> tuple[Path, str]:
        kind, _, version = part.partition(":")
        name = {"meta": f"v{version}.json", "blob": f"v{version}.safetensors"}.get(kind, kind)
        key = f"{self.key_prefix}:t:acme:task:{task}:" + (f"v:{version}:{kind}" if version else kind)
        if kind == "blob" and self.redis is not None:  # content-addressed: the version names its blob
            sha = self.redis.get(f"{self.key_prefix}:t:acme:task:{task}:v:{version}:cas")
            if isinstance(sha, bytes):
                key = f"{self.key_prefix}:blob:{sha.decode()}"
        return self.root / task / name, key

    def read(self, task: str, part: str) -> bytes:
        path, key = self._path_or_key(task, part)
        if self.redis is None:
            return path.read_bytes()
        value = self.redis.get(key)
        assert isinstance(value, bytes), key
        return value

    def write(self, task: str, part: str, value: bytes) -> None:
        path, key = self._path_or_key(task, part)
        if self.redis is None:
            path.write_bytes(value)
        else:
            self.redis.set(key, value)

    def use_count(self, task: str) -> float | None:
        """The store's request count of acme's `task` (what warm starts rank by), None if it has none."""
        if self.redis is None:
            try:
                counts = json.loads((self.root.parent / ".usage.json").read_bytes())
            except FileNotFoundError:
                return None
            return counts.get(f"acme/{task}")
        return self.redis.zscore(f"{self.key_prefix}:usage", f"acme/{task}")

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


@pytest.fixture(params=["local", "redis"])
def store_server(request, spawn_server, key_prefix) -> Iterator[tuple[Any, StoredData]]:  # type: ignore[no-untyped-def]
    """A server on each store backend (its own directory, or the shared Redis under its own key
    prefix) with a quota of 4 tasks, and a handle on its stored data."""
    settings: dict[str, Any] = {"tenant_max_tasks": "4"}
    if request.param == "redis":
        settings |= {"redis_url": SHARED_REDIS, "redis_key_prefix": key_prefix}
    server = spawn_server(**settings)
    data = StoredData(server, key_prefix if request.param == "redis" else None)
    yield server, data
    data.close()


def task_names(response: httpx.Response, field: str = "task") -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    return [item[field] for item in body.get("items", body.get("data", []))]


VICTIM_TASK = "mine"  # globex's task, cached by the server before each attack


def cache_victim_task(client: httpx.Client, loaded) -> None:  # type: ignore[no-untyped-def]
    """globex uploads its task and generates once: from then on the server serves it from its cache."""
    assert upload(client, VICTIM_TASK, artifact_bytes(loaded.spec, 7), headers=GLOBEX).status_code == 201
    assert generate(client, VICTIM_TASK, GLOBEX).status_code == 200


Call = Callable[[], httpx.Response]


def hammer(calls: dict[str, tuple[Call, int]], seconds: float) -> int:
    """Every call in turn, round after round for `seconds`, each answer checked against its expected
    status; returns the rounds made. A short pause between rounds, as a client retrying would make
    (flat out, this process alone would take a core of a 2-core machine from the victim)."""
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < seconds:
        for name, (call, status) in calls.items():
            response = call()
            assert response.status_code == status, (name, response.status_code, response.text[:300])
        rounds += 1
        time.sleep(0.1)
    return rounds


def hammer_with_victim(server, calls: dict[str, tuple[Call, int]], seconds: float = 6.0) -> None:  # type: ignore[no-untyped-def]
    """`hammer` while globex generates with its cached task: globex notices nothing."""
    quiet_s = quiet_generation_s(server.url, VICTIM_TASK)
    victim = Victim(server.url, VICTIM_TASK).run(min_generations=1)
    try:
        rounds = hammer(calls, seconds)
    finally:
        victim.stop()
    assert rounds >= 3, rounds
    assert_victim_unaffected(victim, quiet_s)


def test_a_corrupt_task_fails_alone_and_an_upload_of_it_repairs_it(store_server, loaded):
    server, stored = store_server
    with server.client(timeout=120) as client:
        cache_victim_task(client, loaded)
        for task in ("alpha", "bad", "zeta"):
            assert upload(client, task, artifact_bytes(loaded.spec, 1)).status_code == 201
        stored.write("bad", "current", "\u0661".encode() + b"9" * 500)  # not a version number

        # Listings skip it (logged, counted) instead of failing the whole tenant.
        assert task_names(client.get("/v1/prefixes", headers=ACME)) == ["alpha", "zeta"]
        models = task_names(client.get("/v1/models", headers=ACME), field="id")
        assert "alpha" in models and "zeta" in models and "bad" not in models
        # Uploads of other names work; the broken task still holds its place in the quota of 4.
        assert upload(client, "fresh", artifact_bytes(loaded.spec, 2)).status_code == 201
        refused = upload(client, "extra", artifact_bytes(loaded.spec, 2))
        assert refused.status_code == 429 and refused.json()["error_type"] == "quota_exceeded"
        # The broken task alone answers 503, with a reason a client can act on and no stored bytes.
        for response in (generate(client, "bad"), client.get("/v1/prefixes/bad", headers=ACME)):
            assert response.status_code == 503, response.text
            assert response.json()["error_type"] == "unavailable" and response.headers["retry-after"]
            assert "corrupt" in response.text and "9" * 20 not in response.text  # no stored bytes echoed
        assert generate(client, "alpha").status_code == 200
        metrics = client.get("/metrics").text
        assert (metric_value(metrics, 'prefixserve_store_corrupt_total{operation="list_tasks"}') or 0) >= 2
        assert metric_value(metrics, "prefixserve_store_up") == 1.0  # the store answered: not down
        assert "bad" in server.log_tail(300) and "corrupt" in server.log_tail(300)

        # acme hammers its broken task (and the listings that must skip it): globex notices nothing.
        hammer_with_victim(
            server,
            {
                "list": (lambda: client.get("/v1/prefixes", headers=ACME), 200),
                "models": (lambda: client.get("/v1/models", headers=ACME), 200),
                "generate bad": (lambda: generate(client, "bad"), 503),
                "describe bad": (lambda: client.get("/v1/prefixes/bad", headers=ACME), 503),
            },
        )

        # A new version of the broken task repairs it.
        repaired = upload(client, "bad", artifact_bytes(loaded.spec, 3))
        assert repaired.status_code == 201 and repaired.json()["version"] == 2, repaired.text
        assert generate(client, "bad").status_code == 200
        assert task_names(client.get("/v1/prefixes", headers=ACME)) == ["alpha", "bad", "fresh", "zeta"]


def test_a_damaged_blob_or_split_is_503_for_its_task_only(store_server, loaded):
    server, stored = store_server
    with server.client(timeout=120) as client:
        cache_victim_task(client, loaded)
        # Each task its own bytes: identical uploads share one content-addressed blob on Redis.
        for seed, task in enumerate(("flipped", "truncated", "split", "good"), start=11):
            assert upload(client, task, artifact_bytes(loaded.spec, seed)).status_code == 201
        assert upload(client, "split", artifact_bytes(loaded.spec, 2)).status_code == 201
        blob = bytearray(stored.read("flipped", "blob:1"))
        blob[len(blob) // 2] ^= 0x01  # one flipped bit in the tensor data
        stored.write("flipped", "blob:1", bytes(blob))
        stored.write("truncated", "blob:1", stored.read("truncated", "blob:1")[:-100])
        stored.write("split", "split", b'{"2": 10, "1": "ninety"}')

        for task in ("flipped", "truncated", "split"):
            response = generate(client, task)
            assert response.status_code == 503, (task, response.status_code, response.text[:300])
            assert response.json()["error_type"] == "unavailable", task
        for path in ("/v1/prefixes/split", "/v1/prefixes/split/traffic"):
            response = client.get(path, headers=ACME)
            assert response.status_code == 503 and response.json()["error_type"] == "unavailable", path
        assert generate(client, "good").status_code == 200
        assert task_names(client.get("/v1/prefixes", headers=ACME)) == [
            "flipped",
            "good",
            "split",
            "truncated",
        ]

        # acme hammers its damaged tasks: globex notices nothing.
        calls: dict[str, tuple[Call, int]] = {
            f"generate {task}": (lambda task=task: generate(client, task), 503)
            for task in ("flipped", "truncated", "split")
        }
        calls |= {
            path: (lambda path=path: client.get(path, headers=ACME), 503)
            for path in ("/v1/prefixes/split", "/v1/prefixes/split/traffic")
        }
        calls["list"] = (lambda: client.get("/v1/prefixes", headers=ACME), 200)
        hammer_with_victim(server, calls)

        # Ending the split repairs it: the current version serves everyone again.
        assert client.delete("/v1/prefixes/split/traffic", headers=ACME).status_code == 204
        assert generate(client, "split").status_code == 200
        assert client.get("/v1/prefixes/split/traffic", headers=ACME).json() == {"weights": {}}


def test_traffic_weights_take_only_canonical_version_numbers(spawn_server, loaded):
    server = spawn_server()
    loose = [
        {"\u0661": 100},  # ARABIC-INDIC DIGIT ONE, which int() reads as 1
        {" 2": 100},
        {"1_0": 100},
        {"01": 100},
        {"+1": 100},
        {"1": True},
        {"1": "100"},
        {"1": 100.0},
    ]
    with server.client(timeout=120) as client:
        assert upload(client, "sum", artifact_bytes(loaded.spec, 1)).status_code == 201
        for weights in loose:
            response = client.put("/v1/prefixes/sum/traffic", json={"weights": weights}, headers=ACME)
            assert response.status_code == 422, (weights, response.text)
            assert response.json()["error_type"] == "validation", weights
            assert client.get("/v1/prefixes/sum/traffic", headers=ACME).json() == {"weights": {}}
        ok = client.put("/v1/prefixes/sum/traffic", json={"weights": {"1": 100}}, headers=ACME)
        assert ok.status_code == 200 and ok.json() == {"weights": {"1": 100}}


def test_a_hung_redis_gives_503_within_the_store_deadline(spawn_server, loaded):
    """SIGSTOP on the store's Redis (it accepts connections and never answers): round after round,
    each store call ends at the configured deadline with a 503, while another tenant generating with
    its cached task (no store read needed) and /health carry on as fast as before."""
    deadline_s = 1.5  # PREFIXSERVE_STORE_TIMEOUT_S
    hung = RedisProcess(free_port())
    hung.start()
    stopped = False
    try:
        server = spawn_server(redis_url=hung.url, store_timeout_s=str(deadline_s))

        def timed(call: Any) -> tuple[httpx.Response, float]:
            with server.client(timeout=120) as c:
                started = time.monotonic()
                response = call(c)
                return response, time.monotonic() - started

        with server.client(timeout=120) as client:
            assert upload(client, "cold", artifact_bytes(loaded.spec, 1)).status_code == 201  # not loaded
            assert upload(client, "warm", artifact_bytes(loaded.spec, 2)).status_code == 201
            assert generate(client, "warm").status_code == 200  # now cached
            cache_victim_task(client, loaded)
        quiet_s = quiet_generation_s(server.url, VICTIM_TASK)

        victim = Victim(server.url, VICTIM_TASK).run(min_generations=1)
        try:
            os.kill(hung.process.pid, signal.SIGSTOP)
            stopped = True
            victim.reset()  # what counts: the victim's requests while Redis hangs
            calls = {
                "generate an uncached task": lambda c: generate(c, "cold"),
                "upload": lambda c: upload(c, "new", artifact_bytes(loaded.spec, 3)),
                "list": lambda c: c.get("/v1/prefixes", headers=ACME),
                "describe": lambda c: c.get("/v1/prefixes/warm", headers=ACME),
            }
            results: list[tuple[str, httpx.Response, float]] = []
            started = time.monotonic()
            with ThreadPoolExecutor(len(calls)) as pool:
                while time.monotonic() - started < 6.0:  # three or four rounds
                    pending = {name: pool.submit(timed, call) for name, call in calls.items()}
                    results += [(name, *future.result()) for name, future in pending.items()]
        finally:
            victim.stop()
        for name, response, took in results:
            assert response.status_code == 503, (name, response.text)
            assert response.json()["error_type"] == "unavailable" and response.headers["retry-after"]
            # The deadline plus generous slack for a loaded machine (before: 8-17 s of retries).
            assert took < deadline_s + 3.0, f"{name} took {took:.1f} s (deadline {deadline_s} s)"
        assert len(results) >= 2 * len(calls), len(results)
        assert_victim_unaffected(victim, quiet_s)
        with server.client(timeout=120) as client:
            assert generate(client, "warm").status_code == 200  # what is cached keeps serving
    finally:
        if stopped:
            os.kill(hung.process.pid, signal.SIGCONT)
        hung.stop()


def test_a_deleted_task_leaves_no_use_count(store_server, loaded):
    """The store's per-task request counts (what a warm start ranks tasks by) hold live tasks only: a
    delete drops the task's count, and no later flush of the server brings it back."""
    server, stored = store_server
    with server.client(timeout=120) as client:
        for task in ("gone", "kept"):
            assert upload(client, task, artifact_bytes(loaded.spec, 1)).status_code == 201
            assert generate(client, task).status_code == 200
        # The server adds what it served to the store's counts every few seconds.
        wait_until(lambda: bool(stored.use_count("gone") and stored.use_count("kept")), 60, "use counts")
        assert client.delete("/v1/prefixes/gone", headers=ACME).status_code == 204
        assert stored.use_count("gone") is None
        kept = stored.use_count("kept")
        assert generate(client, "kept").status_code == 200
        wait_until(lambda: (stored.use_count("kept") or 0) > (kept or 0), 60, "a flush after the delete")
        assert stored.use_count("gone") is None


def test_task_churn_leaves_no_files_and_no_memory_behind(spawn_server, loaded):
    """Upload -> generate -> delete of a new task name, a few hundred times (a tenant's CI making a
    task per run): deleted tasks leave no directory or counter file (only the tenant's bounded
    tombstone) and next to no use counts, versions are still never reused, and the server's memory
    stays flat once warm."""
    from server.engine.task_uses import USES_FLUSH_INTERVAL_S

    server = spawn_server()
    root = Path(server.env["PREFIXSERVE_LOCAL_STORE_DIR"]) / "acme"
    data = artifact_bytes(loaded.spec, 1)
    with server.client(timeout=120) as client:

        def churn(first: int, cycles: int) -> None:
            for i in range(first, first + cycles):
                assert upload(client, f"churn-{i}", data).status_code == 201
                assert generate(client, f"churn-{i}", max_new_tokens=2).status_code == 200
                assert client.delete(f"/v1/prefixes/churn-{i}", headers=ACME).status_code == 204

        started = time.monotonic()
        churn(0, 60)  # caches, pools and allocator arenas reach their working size
        # Three windows: memory kept per name ever used grows in each of them alike, while a step of
        # the allocator's own (a new arena, a thread pool growing: a few MiB, seen a few hundred
        # cycles in) lands in one window only.
        window = 150
        grown_kib: list[int] = []
        for first in range(60, 60 + 3 * window, window):
            before = server.rss_kib()
            churn(first, window)
            grown_kib.append(server.rss_kib() - before)
        churn_s = time.monotonic() - started
        assert sorted(os.listdir(root)) == [".deleted"], sorted(os.listdir(root))[:5]
        again = upload(client, "churn-0", data)
        assert again.status_code == 201 and again.json()["version"] == 2  # never reused
    # A delete drops the task's use count. Only a flush racing a delete (its uses taken just before,
    # written just after) can bring a name back: at most one per flush, not one per name.
    usage = root.parent / ".usage.json"
    counts = json.loads(usage.read_bytes()) if usage.exists() else {}
    counted = sorted(name for name in counts if name.startswith("acme/churn-"))
    assert len(counted) <= churn_s / USES_FLUSH_INTERVAL_S + 2, (len(counted), churn_s, counted[:10])
    # Measured here: under 1 KiB per cycle once warm (and a single step of ~4 MiB in one window); the
    # reported leak was 35-50 KiB per cycle, in every window: the bound is under half the smallest.
    assert min(grown_kib) < window * 16, f"RSS grew {grown_kib} KiB in windows of {window} churn cycles"

"""Soak: a real server process under steady mixed traffic from two tenants, with prefix uploads and
deletes in between, for `PREFIXSERVE_SOAK_SECONDS` (default 180). Loopback only, bounded.

Run: `pytest -m soak tests/reliability` (`make soak`). Asserts: zero 5xx and no unexpected 4xx (a 404 is
expected only for a task its tenant deleted), zero lost responses (every request answered, no client
timeouts), and the RSS of the server and its processes (on vLLM, its engine core) after warm-up grows
by less than `MAX_RSS_GROWTH`. `make soak` runs it on both backends where vLLM is installed.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, GLOBEX, generate, upload

SOAK_SECONDS = float(os.environ.get("PREFIXSERVE_SOAK_SECONDS", "180"))
WARMUP_FRACTION = 0.15
MAX_RSS_GROWTH = 0.15  # relative growth of VmRSS between the end of warm-up and the end
CLIENTS = 4
TARGET_RPS = 8.0  # all clients together
TENANTS = {"acme": ACME, "globex": GLOBEX}

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(SOAK_SECONDS) + 300)]


class Tasks:
    """Each tenant's live tasks (what clients pick from) and every task a tenant has deleted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, set[str]] = {t: set() for t in TENANTS}
        self.deleted: dict[str, set[str]] = {t: set() for t in TENANTS}

    def pick(self, rng: random.Random, tenant: str) -> str | None:
        with self.lock:
            live = sorted(self.live[tenant])
        return None if not live or rng.random() < 0.2 else rng.choice(live)


def test_soak_mixed_tenants_tasks_uploads_and_deletes(spawn_server, loaded):
    spec = loaded.spec
    server = spawn_server(max_batch_size=8, max_waiting=64, queue_timeout_s=60, keep_versions=2)
    tasks = Tasks()
    with server.client(timeout=60) as admin:
        for tenant, headers in TENANTS.items():
            for i in range(3):
                assert upload(admin, f"{tenant}-t{i}", artifact_bytes(spec, i), headers).status_code == 201
                tasks.live[tenant].add(f"{tenant}-t{i}")

    deadline = time.monotonic() + SOAK_SECONDS
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()

    def record(kind: str, detail: str = "") -> None:
        with lock:
            outcomes[kind] += 1
            if detail and len(unexpected) < 20:
                unexpected.append(detail)

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        interval = CLIENTS / TARGET_RPS
        with server.client(timeout=120) as client:
            next_at = time.monotonic()
            while time.monotonic() < deadline:
                tenant = rng.choice(sorted(TENANTS))
                task = tasks.pick(rng, tenant)
                try:
                    r = generate(client, task, TENANTS[tenant], max_new_tokens=rng.randint(1, 24))
                except httpx.HTTPError as exc:
                    record("lost", f"{tenant}/{task}: {exc!r}")
                else:
                    with tasks.lock:
                        was_deleted = task in tasks.deleted[tenant]
                    if r.status_code == 200:
                        record("ok")
                    elif r.status_code == 404 and was_deleted:
                        record("404 after delete")
                    else:
                        record(
                            f"unexpected {r.status_code}", f"{tenant}/{task}: {r.status_code} {r.text[:200]}"
                        )
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))

    def manager_loop() -> None:
        """Every ~2 s: a new version of a live task, a new task, or a delete (never the last task)."""
        rng = random.Random(1234)
        counter = 100
        with server.client(timeout=120) as client:
            while time.monotonic() < deadline - 2:
                time.sleep(2.0)
                tenant = rng.choice(sorted(TENANTS))
                headers = TENANTS[tenant]
                with tasks.lock:
                    live = sorted(tasks.live[tenant])
                action = rng.choice(["update", "create", "delete"])
                try:
                    counter += 1
                    if action == "delete" and len(live) > 1:
                        victim = rng.choice(live)
                        with tasks.lock:
                            tasks.live[tenant].discard(victim)
                            tasks.deleted[tenant].add(victim)
                        r = client.delete(f"/v1/prefixes/{victim}", headers=headers)
                        ok = r.status_code == 204
                    elif action == "update" and live:
                        r = upload(client, rng.choice(live), artifact_bytes(spec, counter), headers)
                        ok = r.status_code == 201
                    else:
                        name = f"{tenant}-n{counter}"
                        r = upload(client, name, artifact_bytes(spec, counter), headers)
                        ok = r.status_code == 201
                        if ok:
                            with tasks.lock:
                                tasks.live[tenant].add(name)
                    record(
                        "admin ok" if ok else f"admin unexpected {r.status_code}", "" if ok else r.text[:200]
                    )
                except httpx.HTTPError as exc:
                    record("admin lost", repr(exc))

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=manager_loop, daemon=True))
    for t in threads:
        t.start()
    time.sleep(SOAK_SECONDS * WARMUP_FRACTION)
    rss_start = server.tree_rss_kib()
    for t in threads:
        t.join(timeout=SOAK_SECONDS + 240)
        assert not t.is_alive(), "a client never finished: a request hung"
    rss_end = server.tree_rss_kib()

    total = sum(n for kind, n in outcomes.items() if not kind.startswith("admin"))
    summary = f"{dict(outcomes)}; rss {rss_start} -> {rss_end} KiB; first problems: {unexpected[:5]}"
    print(summary)
    assert outcomes["lost"] == 0 and outcomes["admin lost"] == 0, summary
    assert not [k for k in outcomes if k.startswith(("unexpected", "admin unexpected"))], summary
    assert outcomes["ok"] >= 0.5 * SOAK_SECONDS * TARGET_RPS * 0.5, summary  # the load really ran
    assert outcomes["admin ok"] >= SOAK_SECONDS / 4, summary
    assert total == outcomes["ok"] + outcomes["404 after delete"]
    assert rss_end < rss_start * (1 + MAX_RSS_GROWTH), summary
    assert server.proc is not None and server.proc.poll() is None
    with server.client(timeout=30) as client:
        assert client.get("/ready").status_code == 200

"""Against a real server process: one tenant (acme) sends structured-output schemas that take longer to
compile than the bound, while another (globex) keeps generating.

Each slow schema is refused with a 400 naming the bound (its compile worker is killed at
`GRAMMAR_COMPILE_TIMEOUT_S`, or its compile hits `GRAMMAR_COMPILE_MAX_MEMORY_BYTES` first), the compile counts against acme's concurrency (acme's other requests meanwhile
get 429), and globex's generation latency stays within 2x of its quiet value, `/health` under 100 ms.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.conftest import ACME, Victim, assert_victim_unaffected, generate, quiet_generation_s

pytestmark = pytest.mark.timeout(600)

COMPILE_TIMEOUT_S = 2


def _slow_schema(i: int) -> dict:
    """30,000 enum values (~600 KB): seconds of compile and hundreds of MB against GPT-2's vocabulary;
    new values each time, so no cache can answer for it."""
    return {"enum": [f"v{i}-{k}" for k in range(30_000)]}


def test_slow_to_compile_schemas_are_refused_and_leave_another_tenant_unaffected(spawn_server):
    server = spawn_server(grammar_compile_timeout_s=COMPILE_TIMEOUT_S, tenant_max_concurrent=1)
    with server.client(timeout=120) as client:
        model = client.get("/v1/models", headers=ACME).json()["data"][0]["id"]

        def complete(**fields) -> httpx.Response:
            body = {"model": model, "prompt": "Hi", "max_tokens": 4, **fields}
            return client.post("/v1/completions", json=body, headers=ACME)

        ok = complete(guided_choice=["yes", "no"])  # the compile workers start (not part of the attack)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no"), ok.text
        quiet_s = quiet_generation_s(server.url)
        victim = Victim(server.url).run(min_generations=1)
        refused: list[str] = []
        counted: list[int] = []
        try:
            started, numbers = time.monotonic(), itertools.count()
            with ThreadPoolExecutor(1) as pool:
                while time.monotonic() - started < 12:
                    attack = pool.submit(complete, guided_json=_slow_schema(next(numbers)))
                    time.sleep(0.5)  # the compile runs: acme's concurrency (1) is taken by it
                    if not attack.done():
                        counted.append(generate(client).status_code)
                    r = attack.result()
                    assert r.status_code == 400, r.text
                    refused.append(r.json()["error"]["message"])
        finally:
            victim.stop()
        # Each refusal names the bound it hit: the compile time, or (on a machine that compiles fast
        # enough to get there first) the compile's memory cap.
        bounds = (
            f"did not compile within {COMPILE_TIMEOUT_S} s",
            "needed more memory than a constraint may use",
        )
        assert refused and all(any(b in m for b in bounds) for m in refused), refused
        assert counted and set(counted) == {429}, counted
        assert_victim_unaffected(victim, quiet_s)
        assert complete(guided_choice=["yes", "no"]).status_code == 200  # and the server compiles on

"""Open-ended HTTP load against a deployed prefixserve, mixing tasks and tenants (Locust).

    PREFIXSERVE_BENCH_KEYS='{"key-of-acme-123": ["e2e", "webnlg"], "key-of-globex-1": ["xsum"]}' \
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 -u 64 -r 8 --run-time 5m --headless

Environment (read here, at the edge, once):
- `PREFIXSERVE_BENCH_KEYS`: JSON `{api_key: [task, ...]}`: each simulated user picks one key (one
  tenant) and sends requests for that tenant's tasks. Unset: one anonymous user of a single-tenant
  server with `PREFIXSERVE_BENCH_TASKS` (comma list; empty: the base model only).
- `PREFIXSERVE_BENCH_MAX_NEW_TOKENS` (default 32), `PREFIXSERVE_BENCH_PROMPT_WORDS` (default 40).

Endpoints are weighted like a typical mix: streaming generation (TGI SSE) 3, OpenAI completions 2,
non-streaming generation 1. For streams, Locust's response time is the time to the last byte and a
separate `ttft` entry records the time to the first token event. Requires `pip install locust`
(in the `bench` extra); the benchmark harness itself does not use Locust.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

_KEYS: dict[str, list[str]] = json.loads(os.environ.get("PREFIXSERVE_BENCH_KEYS", "{}") or "{}")
_TASKS = [t for t in os.environ.get("PREFIXSERVE_BENCH_TASKS", "").split(",") if t]
MAX_NEW_TOKENS = int(os.environ.get("PREFIXSERVE_BENCH_MAX_NEW_TOKENS", "32"))
PROMPT_WORDS = int(os.environ.get("PREFIXSERVE_BENCH_PROMPT_WORDS", "40"))
_WORDS = [
    "name",
    "type",
    "food",
    "area",
    "price",
    "near",
    "rating",
    "family",
    "friendly",
    "restaurant",
    "coffee",
]


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(PROMPT_WORDS))


class PrefixServeUser(HttpUser):
    """One client of one tenant, sending a weighted mix of generation requests for its tasks."""

    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.rng = random.Random()
        if _KEYS:
            key = self.rng.choice(sorted(_KEYS))
            self.headers = {"Authorization": f"Bearer {key}"}
            self.tasks_of_tenant: list[str | None] = list(_KEYS[key]) or [None]
        else:
            self.headers = {}
            self.tasks_of_tenant = list(_TASKS) or [None]
        self.base_model = self._base_model_id()

    def _base_model_id(self) -> str:
        with self.client.get(
            "/v1/models", headers=self.headers, name="/v1/models", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return "base"
            return str(resp.json()["data"][0]["id"])

    def _task(self) -> str | None:
        return self.rng.choice(self.tasks_of_tenant)

    @task(3)
    def generate_stream(self) -> None:
        body = {
            "task": self._task(),
            "inputs": _prompt(self.rng),
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS},
        }
        self._stream("/v1/generate_stream", body)

    @task(2)
    def completions(self) -> None:
        task_name = self._task()
        body = {
            "model": task_name or self.base_model,
            "prompt": _prompt(self.rng),
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        self._stream("/v1/completions", body)

    @task(1)
    def generate(self) -> None:
        body = {
            "task": self._task(),
            "inputs": _prompt(self.rng),
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS},
        }
        with self.client.post("/v1/generate", json=body, headers=self.headers, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    def _stream(self, path: str, body: dict[str, object]) -> None:
        start = time.perf_counter()
        first: float | None = None
        with self.client.post(
            path, json=body, headers=self.headers, stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                if '"error"' in payload and "error" in json.loads(payload):
                    resp.failure(payload[:200])
                    return
                if first is None:
                    first = time.perf_counter()
                    events.request.fire(
                        request_type="TTFT",
                        name=path,
                        response_time=(first - start) * 1000,
                        response_length=0,
                        exception=None,
                        context={},
                    )
            resp.success()

"""End to end with the real thing: a Prometheus server scrapes a running prefixserve under a short mixed
load, then every Grafana panel query and every alert expression is run through Prometheus' HTTP API.

Prometheus (Debian's `prometheus` package; `make test` installs it) runs on a free loopback port with a
temporary config and storage directory, scraping every second and evaluating deploy/prometheus/alerts.yaml.
The load: uploads (one invalid), generations for two tasks and the bare model, a stream, a completion,
an unknown task (404), and, after SIGTERM while long generations drain, a refused request (503), so
the error panels have data too. Queries are evaluated at one instant while the server still ran, so the
check does not race the server's exit (after which its series go stale).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.process import ChildProcess, free_port
from tests.api.conftest import artifact_bytes
from tests.deploy.test_manifests import alert_rules, dashboard_expressions, promql_metric_names
from tests.reliability.conftest import ACME, GLOBEX, LONG_POSITIONS, generate, upload, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
NAMESPACE, POD = "prefixserve", "prefixserve-e2e"
LONG_REQUESTS = 4  # generations of LONG_POSITIONS - 64 tokens each, in flight when the drain starts
RATE_WINDOW = "1m"  # the load fits in it; Grafana's $__rate_interval at a 1 s scrape interval


class Prometheus:
    """A `prometheus` process scraping `target` every second, with the alert rules loaded."""

    def __init__(self, work_dir: Path, target: str) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus not on PATH: apt-get install prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "prefixserve",
                    "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}],
                }
            ],
        }
        (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = ChildProcess(
            [
                exe,
                f"--config.file={work_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={work_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            work_dir / "prometheus.log",
        ).start()
        self.process.wait_until(self._ready, 60, "prometheus /-/ready")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def stop(self) -> None:
        self.process.stop(timeout_s=20)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in for this one target."""
    expr = expr.replace("$__rate_interval", RATE_WINDOW)
    return expr.replace("$namespace", NAMESPACE).replace("${namespace}", NAMESPACE).replace("$pod", POD)


def mixed_load(client: httpx.Client, spec: Any) -> None:
    assert upload(client, "sql", artifact_bytes(spec, 1)).status_code == 201
    assert upload(client, "poems", artifact_bytes(spec, 2), GLOBEX).status_code == 201
    assert upload(client, "broken", b"not an artifact").status_code in (400, 422)
    for task, headers in (("sql", ACME), ("sql", ACME), ("poems", GLOBEX), (None, ACME)):
        assert generate(client, task, headers, max_new_tokens=8).status_code == 200
    assert generate(client, "no-such-task").status_code == 404
    body = {"task": "sql", "inputs": "Hello", "parameters": {"max_new_tokens": 8}}
    with client.stream("POST", "/v1/generate_stream", json=body, headers=ACME) as r:
        assert r.status_code == 200 and sum(1 for _ in r.iter_lines()) > 0
    completion = {"model": "poems", "prompt": "Hello", "max_tokens": 8}
    assert client.post("/v1/completions", json=completion, headers=GLOBEX).status_code == 200
    assert client.get("/v1/prefixes", headers=ACME).status_code == 200


def test_prometheus_scrapes_the_server_and_every_panel_and_alert_evaluates(
    spawn_server, prometheus_for, long_gpt2_dir, long_spec
):
    # One row at a time: the long generations below run one after another, so the drain lasts several
    # of them (one alone ended within seconds on a fast CPU, and the server exited before the queries).
    server = spawn_server(model_dir=long_gpt2_dir, shutdown_grace_s=300, max_batch_size=1)
    prom = prometheus_for(f"127.0.0.1:{server.port}")
    with server.client() as client:
        mixed_load(client, long_spec)
        # Long generations keep the draining server (and its /metrics) up while a request is refused.
        long_requests = [
            threading.Thread(
                target=lambda: generate(
                    server.client(timeout=300), "sql", max_new_tokens=LONG_POSITIONS - 64, ignore_eos=True
                )
            )
            for _ in range(LONG_REQUESTS)
        ]
        for thread in long_requests:
            thread.start()
        wait_until(
            lambda: f"prefixserve_requests_waiting {LONG_REQUESTS - 1:.1f}" in client.get("/metrics").text,
            60,
            "one running, the rest waiting",
        )
        server.signal()
        wait_until(lambda: generate(client, "sql").status_code == 503, 30, "a 503 while draining")

        def scraped_the_503() -> bool:
            return bool(prom.query('prefixserve_requests_total{status="503"}', time.time()))

        wait_until(scraped_the_503, 30, "Prometheus to scrape the 503", 0.5)
        time.sleep(2)  # two more scrapes: every rate() has the 503 and the load inside its window
        # The queries read one instant whose latest scrape succeeded: on a loaded 2-core machine one
        # scrape of a server busy with a long generation can pass its timeout (the 1 s interval).
        instants: list[float] = []

        def latest_scrape_up() -> bool:
            instants.append(time.time())
            up = prom.query(f'up{{job="prefixserve", pod="{POD}"}}', instants[-1])
            return [s["value"][1] for s in up] == ["1"]

        wait_until(latest_scrape_up, 30, "a successful scrape after the 503", 0.25)
        at = instants[-1]
    server.stop()  # a second SIGTERM: stop draining now (the queries below read stored samples)
    for thread in long_requests:
        thread.join(timeout=60)

    empty = {}
    for where, expr in dashboard_expressions().items():
        match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.S)
        if match:  # a variable: the label must have values on the series it names
            selector, label = concrete(match.group(1)), match.group(2)
            values = {s.get(label) for s in prom.api("series", **{"match[]": selector})}
            if values - {None} == set():
                empty[where] = expr
        elif not prom.query(concrete(expr), at):
            empty[where] = expr
    assert empty == {}, "dashboard queries without series"

    for rule in alert_rules():
        prom.query(rule["expr"], at)  # parses and evaluates (api() asserts status success)
        # Thresholds are legitimately quiet here: every metric the alert reads must have series.
        for name in promql_metric_names(rule["expr"]):
            assert prom.query(name, at), f"alert {rule['alert']}: no series for {name}"
    groups = prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert {name: r["health"] for name, r in loaded.items() if r["health"] != "ok"} == {}

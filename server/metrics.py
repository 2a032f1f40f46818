"""Prometheus metrics: the names in docs/architecture.md ("Metrics"), on a registry of their own.

`Metrics` owns a `CollectorRegistry` (not the process-global one), so tests can build several apps
side by side, and `Metrics().registry` / `metric_names()` list exactly what a scrape exposes: that list
is the contract with the Grafana dashboard and the alert rules in deploy/.

`Metrics` is also the engine's `EngineObserver`: the engine calls `on_*` from its loop, so every
callback is cheap (a dict lookup and a float add) and never raises.

Label cardinality is bounded on purpose: task names come from the public, so `TaskLabeler` gives a
task its own label only if it is on the allow-list (`metrics_task_labels`) or, without one, if it is
among the first `metrics_top_tasks` tasks served (sticky, so series do not flap; only tasks that
exist are counted, the API records a request once the engine accepted it); everything else is
"other". Requests without a task are "base". Tenant labels come only from configured API keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.engine import EngineObserver

# The `_created` series prometheus-client adds to every counter/histogram double the scrape size for
# nothing our dashboards or rules use. (A process-wide switch of the library.)
disable_created_metrics()

PREFIX = "prefixserve_"
OTHER = "other"
BASE_TASK = "base"  # label of requests without a task (the bare base model)

# Latency buckets (seconds): ms-scale steps on a tiny model up to minutes for long generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class TaskLabeler:
    """Maps (tenant, task) to bounded label values. Thread-safe (engine loop and HTTP handlers)."""

    def __init__(self, allow: Iterable[str] = (), top_n: int = 20, tenants: Iterable[str] = ()) -> None:
        self._allow = frozenset(allow)
        self._top_n = top_n
        self._tenants = frozenset(tenants)
        self._labelled: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def tenant(self, tenant: str | None) -> str:
        """The tenant itself if it is configured (API keys or single-tenant "default"), else "other"."""
        return tenant if tenant is not None and tenant in self._tenants else OTHER

    def task(self, tenant: str | None, task: str | None) -> str:
        """The label of a served request for `task`: its name, "base" (no task), or "other"."""
        if task is None:
            return BASE_TASK
        if self._allow:
            return task if task in self._allow else OTHER
        key = (tenant or "", task)
        with self._lock:
            if key in self._labelled:
                return task
            if len(self._labelled) < self._top_n:
                self._labelled.add(key)
                return task
        return OTHER

    def engine_label(self, label: str) -> str:
        """An engine "tenant/task" label with both parts bounded, without taking a label slot."""
        tenant, _, task = label.partition("/")
        if self._allow:
            name = task if task in self._allow else OTHER
        else:
            with self._lock:
                name = task if (tenant, task) in self._labelled else OTHER
        return f"{self.tenant(tenant)}/{name}"


class _TaskInfoCollector(Collector):
    """`prefixserve_task_requests_info`: one sample per scrape, labels listing running/waiting tasks.

    Like vLLM's `lora_requests_info` (read by the Gateway API inference extension for adapter
    affinity): value = scrape time, labels = comma lists. Built at scrape time from the engine so no
    stale label combinations linger in the registry.
    """

    def __init__(self, source: Callable[[], tuple[Iterable[str], Iterable[str]]] | None, max_tasks: int):
        self.source = source
        self.max_tasks = max_tasks

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{PREFIX}task_requests_info",
            "Tasks with running / waiting requests on this replica (value: unix time of the scrape).",
            labels=["running_tasks", "waiting_tasks", "max_tasks"],
        )

    def collect(self) -> Iterator[Metric]:
        import time

        family = self._family()
        running: Iterable[str] = ()
        waiting: Iterable[str] = ()
        if self.source is not None:
            try:
                running, waiting = self.source()
            except Exception:  # a scrape must never fail because the engine is mid-shutdown
                running, waiting = (), ()
        family.add_metric(
            [",".join(sorted(set(running))), ",".join(sorted(set(waiting))), str(self.max_tasks)], time.time()
        )
        yield family


class Metrics(EngineObserver):
    """Every prefixserve metric on one registry; also the engine's `EngineObserver`."""

    def __init__(
        self,
        task_labels: Iterable[str] = (),
        top_tasks: int = 20,
        tenants: Iterable[str] = ("default",),
        max_tasks: int = 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labeler = TaskLabeler(task_labels, top_tasks, tenants)
        r = self.registry
        p = PREFIX
        self.requests_total = Counter(
            f"{p}requests", "HTTP requests by endpoint (route template) and status code.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.requests_running = Gauge(f"{p}requests_running", "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge(f"{p}requests_waiting", "Requests waiting in the queue.", registry=r)
        self.time_to_first_token = Histogram(
            f"{p}time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{p}inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            f"{p}e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Arrival to first scheduled.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self.request_finish = Counter(
            f"{p}request_finish", "Finished generations by reason.", ["finish_reason"], registry=r
        )
        self.batch_size = Histogram(
            f"{p}batch_size", "Rows per decode step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            f"{p}batch_tasks", "Distinct tasks per decode step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.prefix_cache_hits = Counter(
            f"{p}prefix_cache_hits", "Prefix cache hits by tier.", ["tier"], registry=r
        )
        self.prefix_cache_misses = Counter(
            f"{p}prefix_cache_misses", "Prefix cache misses (loaded from the store).", registry=r
        )
        self.prefix_cache_evictions = Counter(
            f"{p}prefix_cache_evictions", "Prefix cache evictions by tier.", ["tier"], registry=r
        )
        self.prefix_cache_bytes = Gauge(
            f"{p}prefix_cache_bytes", "Bytes of prefixes cached by tier.", ["tier"], registry=r
        )
        self.prefix_load = Histogram(
            f"{p}prefix_load_seconds", "Fetching + validating + placing a prefix on a cache miss.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            f"{p}store_errors", "Prefix store failures by operation.", ["operation"], registry=r
        )
        self.prefix_uploads = Counter(
            f"{p}prefix_uploads",
            "Prefix uploads by outcome (created, invalid, error).",
            ["outcome"],
            registry=r,
        )
        self.kv_cache_usage = Gauge(f"{p}kv_cache_usage_ratio", "Share of KV cache slots in use.", registry=r)
        self.task_requests = Counter(
            f"{p}task_requests", "Generation requests by tenant and task (bounded labels, rest 'other').",
            ["tenant", "task"], registry=r,
        )  # fmt: skip
        self.variant_requests = Counter(  # issue 18: canary rollouts; variant is current|primary|canary
            f"{p}prefix_variant_requests", "Generation requests by the variant of the task version served.",
            ["tenant", "task", "variant"], registry=r,
        )  # fmt: skip
        self.engine_up = Gauge(f"{p}engine_up", "1 while the engine loop runs.", registry=r)
        self.store_up = Gauge(f"{p}store_up", "1 while the prefix store answers.", registry=r)
        self.store_up.set(1)
        self.task_info = _TaskInfoCollector(None, max_tasks)
        r.register(self.task_info)
        for tier in ("device", "host"):  # so dashboards see 0 rather than "no data"
            self.prefix_cache_hits.labels(tier=tier)
            self.prefix_cache_evictions.labels(tier=tier)

    # --- introspection ----------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """Sample family names as exposed (counters with `_total`), sorted: the dashboard contract."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
        return sorted(names)

    def bind_engine(self, engine: Any) -> None:
        """Read gauges from the engine at scrape time (running/waiting, up, task lists)."""
        self.requests_running.set_function(lambda: float(engine.num_running))
        self.requests_waiting.set_function(lambda: float(engine.num_waiting))
        self.engine_up.set_function(lambda: 1.0 if engine.healthy else 0.0)
        self.kv_cache_usage.set_function(lambda: float(engine.kv_usage_ratio))
        # /metrics needs no key: raw task names of any tenant stay inside the labeler's bounded set.
        self.task_info.source = lambda: (
            [self.labeler.engine_label(t) for t in engine.running_tasks],
            [self.labeler.engine_label(t) for t in engine.waiting_tasks],
        )

        def cache_bytes(tier: str) -> Callable[[], float]:
            def read() -> float:
                stats = engine.prefix_cache_stats
                return 0.0 if stats is None else float(stats.bytes.get(tier, 0))

            return read

        for tier in ("device", "host"):
            self.prefix_cache_bytes.labels(tier=tier).set_function(cache_bytes(tier))

    # --- API-side events ----------------------------------------------------------------------

    def observe_http(self, endpoint: str, status: int) -> None:
        self.requests_total.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_task_request(self, tenant: str | None, task: str | None) -> None:
        self.task_requests.labels(
            tenant=self.labeler.tenant(tenant), task=self.labeler.task(tenant, task)
        ).inc()

    def observe_variant(self, tenant: str | None, task: str | None, variant: str | None) -> None:
        """Which variant of a task's versions served a request (issue 18: canary vs primary)."""
        if task is not None and variant is not None:
            self.variant_requests.labels(
                tenant=self.labeler.tenant(tenant), task=self.labeler.task(tenant, task), variant=variant
            ).inc()

    def observe_store(self, operation: str, ok: bool) -> None:
        """Record a store call's outcome: failures count per operation and mark the store down."""
        if ok:
            self.store_up.set(1)
        else:
            self.store_errors.labels(operation=operation).inc()
            self.store_up.set(0)

    def observe_upload(self, outcome: str) -> None:
        self.prefix_uploads.labels(outcome=outcome).inc()

    # --- EngineObserver (called on the engine's event loop; cheap, never raise) --------------

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.batch_size.observe(batch_size)
        self.batch_tasks.observe(num_distinct_tasks)

    def on_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_token(self, inter_token_seconds: float) -> None:
        self.inter_token_latency.observe(inter_token_seconds)

    def on_finish(
        self,
        reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        e2e_seconds: float,
        tenant: str,
        task: str | None,
    ) -> None:
        self.request_finish.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.e2e_latency.observe(e2e_seconds)

    def on_prefix_load(self, seconds: float) -> None:
        self.prefix_load.observe(seconds)
        self.store_up.set(1)  # a load is a successful store read

    def on_cache_event(self, kind: str, tier: str) -> None:
        if kind == "hit":
            self.prefix_cache_hits.labels(tier=tier).inc()
        elif kind == "miss":
            self.prefix_cache_misses.inc()
        elif kind == "eviction":
            self.prefix_cache_evictions.labels(tier=tier).inc()

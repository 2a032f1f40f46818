"""Prometheus metrics: the names in docs/architecture.md ("Metrics"), on a registry of their own.

`Metrics` owns a `CollectorRegistry` (not the process-global one), so tests can build several apps
side by side, and `Metrics().registry` / `metric_names()` list exactly what a scrape exposes: that list
is the contract with the Grafana dashboard and the alert rules in deploy/.

`Metrics` is also the engine's `EngineObserver`: the engine calls `on_*` from its loop, so every
callback is cheap (a dict lookup and a float add) and never raises.

Label cardinality is bounded on purpose, and `/metrics` needs no key, so task names are private by
default: `TaskLabeler` gives a task its own label only if it is on the allow-list
(`metrics_task_labels`) or, when an operator opts in with `metrics_top_tasks` > 0, if it is among the
first N tasks served (sticky, so series do not flap); everything else is "other". Requests without a
task are "base". Tenant labels come only from configured API keys.

Routers built for vLLM read vLLM's metric names (`server.vllm_metrics`): they are exported next to
ours, from the same engine state.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from prefix_store.jobs.model import STATUSES as JOB_STATUSES
from server.engine.interface import ServingEngine
from server.engine.observer import EngineObserver
from server.vllm_metrics import TaskListsInfo, VllmMetrics

# The `_created` series prometheus-client adds to every counter/histogram double the scrape size for
# nothing our dashboards or rules use. (A process-wide switch of the library.)
disable_created_metrics()

PREFIX = "prefixserve_"
OTHER = "other"
BASE_TASK = "base"  # label of requests without a task (the bare base model)

# Buckets (seconds), one set per time scale: a set spanning milliseconds to minutes has too few
# buckets at either end for a useful quantile.
# - waits before work starts (queue time, time to first token, prefix loads): 1 ms .. 1 min
FAST_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# - whole requests (a long generation on a busy GPU takes minutes): 50 ms .. 20 min
REQUEST_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
# - one decode step: 1 ms .. 2.5 s
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Prompt / generation lengths in tokens (1-2-5 steps up to the longest context we serve).
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
STORE_OPERATIONS = ("put", "list_tasks", "describe", "delete", "rollback", "probe")
CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")
GRAMMAR_COMPILE_OUTCOMES = ("ok", "invalid", "timeout", "memory", "busy", "tenant", "unavailable")
# Grammar compiles: a cached tokenizer's simple schema takes milliseconds, a hostile one hits the
# deadline (5 s by default): 1 ms .. 30 s.
COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPLOAD_OUTCOMES = ("created", "invalid", "error")
# Probes and the scrape itself: counting them would let a draining pod's /ready 503s fire the 5xx
# alert, and would make the request rate a function of the scrape and probe intervals.
UNCOUNTED_ENDPOINTS = frozenset({"/health", "/ready", "/metrics"})


class TaskLabeler:
    """Maps (tenant, task) to bounded label values. Thread-safe (engine loop and HTTP handlers)."""

    def __init__(self, allow: Iterable[str] = (), top_n: int = 0, tenants: Iterable[str] = ()) -> None:
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


class Metrics(EngineObserver):
    """Every prefixserve metric on one registry; also the engine's `EngineObserver`."""

    def __init__(
        self,
        task_labels: Iterable[str] = (),
        top_tasks: int = 0,
        tenants: Iterable[str] = ("default",),
        max_tasks: int = 0,
        model_name: str = "base",
        adapter_names: str = "off",
        version: str = "0.0.0+unknown",
        max_model_len: int = 1024,
        cache_info: dict[str, str] | None = None,
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
            buckets=FAST_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{p}inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            f"{p}e2e_request_latency_seconds", "Arrival to last token.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Arrival to first scheduled.",
            buckets=FAST_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self.request_prompt_tokens = Histogram(
            f"{p}request_prompt_tokens", "Prompt length of finished requests (tokens).",
            buckets=LENGTH_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_generation_tokens = Histogram(
            f"{p}request_generation_tokens", "Tokens generated per finished request.",
            buckets=LENGTH_BUCKETS, registry=r,
        )  # fmt: skip
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
            buckets=FAST_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            f"{p}store_errors", "Prefix store failures by operation.", ["operation"], registry=r
        )
        self.store_corrupt = Counter(
            f"{p}store_corrupt",
            "Store reads that found data the server did not write (a task's garbled pointer, metadata, "
            "split or blob), by operation; listings count each corrupt task they leave out.",
            ["operation"],
            registry=r,
        )
        self.prefix_uploads = Counter(
            f"{p}prefix_uploads",
            "Prefix uploads by outcome (created, invalid, error).",
            ["outcome"],
            registry=r,
        )
        self.store_reads = Counter(
            f"{p}prefix_store_reads", "Prefix blobs read from the store, by reason (request, warm).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.store_read_bytes = Counter(
            f"{p}prefix_store_read_bytes", "Bytes of prefix blobs read from the store, by reason (request, warm).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.warm_start_tasks = Counter(
            f"{p}warm_start_tasks", "Tasks a warm start tried to load before readiness, by outcome (loaded, failed).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.kv_cache_usage = Gauge(f"{p}kv_cache_usage_ratio", "Share of KV cache slots in use.", registry=r)
        self.task_requests = Counter(
            f"{p}task_requests", "Generation requests by tenant and task (bounded labels, rest 'other').",
            ["tenant", "task"], registry=r,
        )  # fmt: skip
        self.variant_requests = Counter(  # canary rollouts; variant is current|primary|canary
            f"{p}prefix_variant_requests", "Generation requests by the variant of the task version served.",
            ["tenant", "task", "variant"], registry=r,
        )  # fmt: skip
        # Fine-tuning jobs: read from the job store by every replica (the same values on each).
        self.fine_tuning_jobs = Gauge(
            f"{p}fine_tuning_jobs", "Fine-tuning jobs by status, all tenants.", ["status"], registry=r
        )
        self.fine_tuning_queue_length = Gauge(
            f"{p}fine_tuning_queue_length", "Fine-tuning jobs queued for a training worker.", registry=r
        )
        self.fine_tuning_trained_tokens = Counter(
            f"{p}fine_tuning_trained_tokens", "Tokens trained by the fine-tuning jobs this replica stored.",
            registry=r,
        )  # fmt: skip
        self.structured_requests = Counter(
            f"{p}structured_requests", "Requests with a structured-output constraint, by its kind.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.grammar_cache_hits = Counter(
            f"{p}grammar_cache_hits", "Constrained requests whose compiled grammar was cached.", registry=r
        )
        self.grammar_cache_misses = Counter(
            f"{p}grammar_cache_misses", "Constrained requests that compiled (or waited for) their grammar.",
            registry=r,
        )  # fmt: skip
        self.grammar_compile = Histogram(
            f"{p}grammar_compile_seconds", "Wall time of a grammar compile (worker round trip included).",
            buckets=COMPILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.grammar_compile_outcomes = Counter(
            f"{p}grammar_compiles",
            "Grammar compiles by outcome (ok, invalid, timeout, memory, busy, tenant, unavailable).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.engine_up = Gauge(f"{p}engine_up", "1 while the engine loop runs.", registry=r)
        self.store_up = Gauge(f"{p}store_up", "1 while the prefix store answers.", registry=r)
        self.store_up.set(1)
        # Like vLLM's `lora_requests_info`, with bounded "tenant/task" names (see TaskLabeler).
        self.task_info = TaskListsInfo(
            f"{p}task_requests_info",
            "Tasks with running / waiting requests on this replica (value: unix time of the scrape).",
            ("max_tasks", "running_tasks", "waiting_tasks"),
            max_tasks,
            self.labeler.engine_label,
        )
        r.register(self.task_info)
        self.build_info = Gauge(
            f"{p}build_info", "Always 1; labels: the server's version and Python version.",
            ["version", "python_version"], registry=r,
        )  # fmt: skip
        self.build_info.labels(version=version, python_version=platform.python_version()).set(1)
        # process_* (resident memory, CPU seconds, start time: restarts show as a new start time).
        # Only on Linux is there anything to collect; elsewhere the collector exports nothing.
        ProcessCollector(registry=r)
        self.vllm = VllmMetrics(
            r, model_name, max_lora=max_tasks, adapter_names=adapter_names,
            max_model_len=max_model_len, cache_info=cache_info,
        )  # fmt: skip
        # Known label values start at 0, so dashboards and alerts see 0 rather than "no data".
        for tier in ("device", "host"):
            self.prefix_cache_hits.labels(tier=tier)
            self.prefix_cache_evictions.labels(tier=tier)
        for reason in ("request", "warm"):
            self.store_reads.labels(reason=reason)
            self.store_read_bytes.labels(reason=reason)
        for outcome in ("loaded", "failed"):
            self.warm_start_tasks.labels(outcome=outcome)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation=operation)
            self.store_corrupt.labels(operation=operation)
        for outcome in UPLOAD_OUTCOMES:
            self.prefix_uploads.labels(outcome=outcome)
        for status in JOB_STATUSES:
            self.fine_tuning_jobs.labels(status=status)
        for kind in CONSTRAINT_KINDS:
            self.structured_requests.labels(kind=kind)
        for outcome in GRAMMAR_COMPILE_OUTCOMES:
            self.grammar_compile_outcomes.labels(outcome=outcome)

    # --- introspection ----------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """Sample family names as exposed (counters with `_total`), sorted: the dashboard contract."""
        names: set[str] = set()
        for family in self.registry.collect():
            if not family.name.startswith(PREFIX):
                continue  # process_* and vllm:* follow their own conventions (listed in the docs)
            names.add(family.name + "_total" if family.type == "counter" else family.name)
        return sorted(names)

    def bind_engine(self, engine: ServingEngine) -> None:
        """Read gauges from the engine at scrape time (running/waiting, up, task lists)."""
        self.requests_running.set_function(lambda: float(engine.num_running))
        self.requests_waiting.set_function(lambda: float(engine.num_waiting))
        self.engine_up.set_function(lambda: 1.0 if engine.healthy else 0.0)
        self.kv_cache_usage.set_function(lambda: float(engine.kv_usage_ratio))
        # /metrics needs no key: raw task names of any tenant stay inside the labeler's bounded set.
        self.task_info.source = lambda: (engine.running_tasks, engine.waiting_tasks)

        def cache_bytes(tier: str) -> Callable[[], float]:
            return lambda: float(engine.prefix_cache_bytes(tier))

        for tier in ("device", "host"):
            self.prefix_cache_bytes.labels(tier=tier).set_function(cache_bytes(tier))
        self.vllm.bind_engine(engine)

    # --- API-side events ----------------------------------------------------------------------

    def observe_http(self, endpoint: str, status: int) -> None:
        if endpoint in UNCOUNTED_ENDPOINTS:
            return
        self.requests_total.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_task_request(self, tenant: str | None, task: str | None) -> None:
        self.task_requests.labels(
            tenant=self.labeler.tenant(tenant), task=self.labeler.task(tenant, task)
        ).inc()

    def observe_variant(self, tenant: str | None, task: str | None, variant: str | None) -> None:
        """Which variant of a task's versions served a request (Canary vs primary)."""
        if task is not None and variant is not None:
            self.variant_requests.labels(
                tenant=self.labeler.tenant(tenant), task=self.labeler.task(tenant, task), variant=variant
            ).inc()

    def observe_request_n(self, n: int) -> None:
        """One prompt of a request asked for `n` sequences (vLLM's `request_params_n`)."""
        self.vllm.observe_n(n)

    def observe_store(self, operation: str, ok: bool) -> None:
        """Record a store call's outcome: failures count per operation and mark the store down."""
        if ok:
            self.store_up.set(1)
        else:
            self.store_errors.labels(operation=operation).inc()
            self.store_up.set(0)

    def observe_store_corrupt(self, operation: str, count: int = 1) -> None:
        """Corrupt data found: counted per operation; the store answered, so it is not marked down."""
        self.store_corrupt.labels(operation=operation).inc(count)

    def observe_upload(self, outcome: str) -> None:
        self.prefix_uploads.labels(outcome=outcome).inc()

    def observe_fine_tuning(self, counts: dict[str, int]) -> None:
        """The job store's jobs per status (the queue is the `queued` ones)."""
        for status in JOB_STATUSES:
            self.fine_tuning_jobs.labels(status=status).set(counts.get(status, 0))
        self.fine_tuning_queue_length.set(counts.get("queued", 0))

    # --- EngineObserver (called on the engine's event loop; cheap, never raise) --------------

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        self.batch_size.observe(batch_size)
        self.batch_tasks.observe(num_distinct_tasks)

    def on_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)
        self.vllm.on_queue_time(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
        self.vllm.on_first_token(seconds)

    def on_token(self, inter_token_seconds: float) -> None:
        self.inter_token_latency.observe(inter_token_seconds)
        self.vllm.on_token(inter_token_seconds)

    def on_iteration(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.vllm.on_iteration(prompt_tokens, generation_tokens)

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
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated_tokens)
        self.e2e_latency.observe(e2e_seconds)
        self.vllm.on_finish(reason, prompt_tokens, generated_tokens, e2e_seconds)

    def on_prefix_load(self, seconds: float) -> None:
        self.prefix_load.observe(seconds)
        self.store_up.set(1)  # a load is a successful store read

    def on_store_read(self, reason: str, nbytes: int) -> None:
        self.store_reads.labels(reason=reason).inc()
        self.store_read_bytes.labels(reason=reason).inc(nbytes)

    def on_cache_event(self, kind: str, tier: str) -> None:
        if kind == "hit":
            self.prefix_cache_hits.labels(tier=tier).inc()
        elif kind == "miss":
            self.prefix_cache_misses.inc()
        elif kind == "eviction":
            self.prefix_cache_evictions.labels(tier=tier).inc()

    def on_structured_request(self, kind: str) -> None:
        if kind in CONSTRAINT_KINDS:
            self.structured_requests.labels(kind=kind).inc()

    def on_grammar_cache(self, hit: bool) -> None:
        (self.grammar_cache_hits if hit else self.grammar_cache_misses).inc()

    def on_grammar_compile(self, seconds: float, outcome: str) -> None:
        if outcome in ("ok", "invalid", "timeout", "memory"):  # a worker compiled (the others never began)
            self.grammar_compile.observe(seconds)
        if outcome in GRAMMAR_COMPILE_OUTCOMES:
            self.grammar_compile_outcomes.labels(outcome=outcome).inc()

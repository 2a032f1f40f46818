"""vLLM-named gauges, for routers built around vLLM (the Gateway API Inference Extension's endpoint picker).

The endpoint picker (EPP) of an `InferencePool` scrapes each pod and reads, by vLLM's names:

| series | what it means here |
|---|---|
| `vllm:num_requests_running{model_name}` | requests in the running batch (= `prefixserve_requests_running`) |
| `vllm:num_requests_waiting{model_name}` | requests queued (= `prefixserve_requests_waiting`) |
| `vllm:kv_cache_usage_perc{model_name}` | KV positions reserved, as a fraction 0..1 (vLLM's unit, despite the name) |
| `vllm:gpu_cache_usage_perc{model_name}` | the same, under the name older EPP releases read |
| `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` | value: scrape time; see below |

The colons break our own naming rule on purpose: they are the names those routers look up.

Counters and histograms, for dashboards, benchmark tools and the vLLM production stack, with the
names, types, label names (`model_name`, `engine`; always engine "0": one engine per process) and
bucket boundaries of vLLM's `vllm/v1/metrics/loggers.py` (`PrometheusStatLogger`), plus
`vllm:inter_token_latency_seconds`, the name later vLLM releases give the per-token histogram (same
19 buckets; `vllm:time_per_output_token_seconds`, the older name, is exported beside it with the same
observations, as vLLM did while it deprecated it):

| series | type | here |
|---|---|---|
| `vllm:prompt_tokens_total` / `vllm:generation_tokens_total` | counter | prompt tokens / generated tokens of every finished request (cancelled ones included) |
| `vllm:request_success_total{finished_reason}` | counter | finished requests by vLLM's reason: `stop` (EOS or a stop sequence), `length`, `abort` (cancelled or failed) |
| `vllm:num_preemptions_total` | counter | always 0: the engine reserves a request's KV before admitting it and never preempts |
| `vllm:time_to_first_token_seconds` | histogram | arrival to first token |
| `vllm:inter_token_latency_seconds`, `vllm:time_per_output_token_seconds` | histogram | between consecutive tokens of a request |
| `vllm:e2e_request_latency_seconds` | histogram | arrival to last token |
| `vllm:request_queue_time_seconds` | histogram | arrival to first scheduled |
| `vllm:request_prompt_tokens` / `vllm:request_generation_tokens` | histogram | per finished request; 1-2-5 buckets up to the model's positions (vLLM: max_model_len) |
| `vllm:request_params_n` | histogram | `n` of each prompt of a request (sequences generated for it) |
| `vllm:iteration_tokens_total` | histogram | tokens of one engine step: prompt tokens computed + tokens generated |
| `vllm:cache_config_info` | gauge = 1 | labels: the KV cache's block size and dtype, prefix caching (of prompts: False) |

The vLLM source followed: vllm-project/vllm `vllm/v1/metrics/loggers.py` at commit 005a810 (the
copy we could read; the project pins vLLM 0.32 for its vLLM backend, whose tag was out of reach);
`inter_token_latency_seconds` and its buckets as later releases name them.

Residency. vLLM lists the adapters loaded on the GPU; the EPP's `lora-affinity-scorer` gives a pod 1.0
when the request's `model` is in `running_lora_adapters`, 0.8 when the pod lists fewer adapters than
`max_lora` (room to load one more), 0.6 when it is in `waiting_lora_adapters`, else 0. So here:
`running_lora_adapters` = tasks whose prefix is resident in the device tier now
(`Engine.resident_prefixes`, whether or not a request is running), `waiting_lora_adapters` = tasks with
requests running or queued whose prefix is not resident (being loaded), and `max_lora` =
`Engine.resident_prefix_capacity` (prefixes the device tier holds). Pods then differ by what they hold,
which is what affinity needs; the batch size would make every pod look alike.

Adapter names. The EPP matches a request's `model` (a task name here) against the comma lists of
`vllm:lora_requests_info` to prefer a pod whose device prefix cache already holds the task. `/metrics`
needs no key, so by default (`adapter_names="off"`) the lists stay empty and no task name is shown to
anyone; `max_lora` is still exported. Operators opt in:

- `"task"`: the task name, exactly what clients send as `model` and what the EPP matches. Only a
  tenant's own request ever uses its prefix; two tenants' tasks of the same name share one adapter
  name, so affinity treats them as one (a routing hint, never a correctness issue).
- `"tenant_task"`: `tenant/task`, so one tenant's tasks never appear under another tenant's name;
  for dashboards, and for gateways that rewrite `model` per tenant before the EPP sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.interface import ServingEngine

AdapterNames = Literal["off", "task", "tenant_task"]
ADAPTER_NAME_MODES: tuple[AdapterNames, ...] = ("off", "task", "tenant_task")


# vLLM's bucket boundaries (loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's FinishReason values; our engine's reasons map onto them.
FINISHED_REASONS = ("stop", "length", "abort")
_FINISHED_REASON = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
ENGINE = "0"  # vLLM's `engine` label: the engine core's index (one here)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's length buckets: 1, 2, 5, 10, 20, 50, ... while <= `max_value`."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


def adapter_name(engine_label: str, mode: str) -> str | None:
    """The adapter name of an engine "tenant/task" label under `mode` (None: not listed)."""
    if mode == "task":
        return engine_label.partition("/")[2] or None
    if mode == "tenant_task":
        return engine_label
    return None


class TaskListsInfo(Collector):
    """An info gauge like vLLM's `lora_requests_info`: one sample per scrape, value = scrape time, labels
    (max, running list, waiting list) built from the engine's "tenant/task" labels at scrape time (so no
    stale label combinations linger in the registry). `name_of` maps a label to its listed name (None:
    not listed); `source` is set once the engine exists."""

    def __init__(
        self, name: str, doc: str, labels: tuple[str, str, str], max_value: int,
        name_of: Callable[[str], str | None],
    ) -> None:  # fmt: skip
        self.name, self.doc, self.labels = name, doc, labels
        self.max_value = max_value
        self.name_of = name_of
        self.source: Callable[[], tuple[Iterable[str], Iterable[str]]] | None = None
        self.max_source: Callable[[], int] | None = None  # read at scrape time when set (else max_value)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.doc, labels=list(self.labels))

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _names(self, labels: Iterable[str]) -> str:
        names = {self.name_of(label) for label in labels}
        return ",".join(sorted(n for n in names if n))

    def collect(self) -> Iterator[Metric]:
        running: Iterable[str] = ()
        waiting: Iterable[str] = ()
        max_value = self.max_value
        try:
            if self.source is not None:
                running, waiting = self.source()
            if self.max_source is not None:
                max_value = self.max_source()
        except Exception:  # a scrape must never fail because the engine is mid-shutdown
            running, waiting = (), ()
        family = self._family()
        family.add_metric([str(max_value), self._names(running), self._names(waiting)], time.time())
        yield family


class VllmMetrics:
    """The vLLM-named series on `registry`: gauges read from the engine at scrape time, counters and
    histograms fed by `Metrics`' engine callbacks (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        max_lora: int,
        adapter_names: str,
        max_model_len: int = 1024,
        cache_info: dict[str, str] | None = None,
    ) -> None:
        if adapter_names not in ADAPTER_NAME_MODES:
            raise ValueError(f"adapter_names must be one of {ADAPTER_NAME_MODES}, got {adapter_names!r}")
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name"], registry=registry)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting in the queue.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache use, fraction 0..1.")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc", "KV-cache use, fraction 0..1 (old name).")
        self.lora_info = TaskListsInfo(
            "vllm:lora_requests_info",
            "Adapters (prefixserve: tasks) resident on the device / loading, and how many the device holds;"
            " value: unix time of the scrape.",
            ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
            max_lora,
            lambda label: adapter_name(label, adapter_names),
        )
        registry.register(self.lora_info)

        labels = {"model_name": model_name, "engine": ENGINE}

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, list(labels), registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Any:
            return Histogram(name, doc, list(labels), buckets=list(buckets), registry=registry).labels(
                **labels
            )

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*labels, "finished_reason"], registry=registry,
        )  # fmt: skip
        self.request_success = {r: success.labels(**labels, finished_reason=r) for r in FINISHED_REASONS}
        lengths = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )  # fmt: skip
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds. DEPRECATED: use vllm:inter_token_latency_seconds.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        info = {"engine": ENGINE, **(cache_info or {})}
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(info),
            registry=registry,
        ).labels(**info).set(1)

    def bind_engine(self, engine: ServingEngine) -> None:
        m = self.model_name
        self.running.labels(model_name=m).set_function(lambda: float(engine.num_running))
        self.waiting.labels(model_name=m).set_function(lambda: float(engine.num_waiting))
        for gauge in (self.kv_usage, self.gpu_cache_usage):
            gauge.labels(model_name=m).set_function(lambda: float(engine.kv_usage_ratio))
        self.lora_info.source = lambda: residency_lists(engine)
        self.lora_info.max_source = lambda: int(engine.resident_prefix_capacity)

    # --- fed by `Metrics` (the engine's observer) ------------------------------------------------

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)
        self.time_per_output_token.observe(seconds)

    def on_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def on_iteration(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.iteration_tokens.observe(prompt_tokens + generation_tokens)

    def on_finish(self, reason: str, prompt_tokens: int, generated_tokens: int, e2e_seconds: float) -> None:
        self.request_success[_FINISHED_REASON.get(reason, "abort")].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated_tokens)
        self.e2e_latency.observe(e2e_seconds)

    def observe_n(self, n: int) -> None:
        self.request_params_n.observe(n)


def residency_lists(engine: Any) -> tuple[list[str], list[str]]:
    """("tenant/task" labels resident on the device, those with requests whose prefix is not)."""
    resident = [f"{tenant}/{task}" for tenant, task in engine.resident_prefixes]
    wanted = set(engine.running_tasks) | set(engine.waiting_tasks)
    return resident, sorted(wanted - set(resident))

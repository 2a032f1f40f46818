"""vLLM-named gauges, for routers built around vLLM (the Gateway API Inference Extension's endpoint picker).

The endpoint picker (EPP) of an `InferencePool` scrapes each pod and reads, by vLLM's names:

| series | what it means here |
|---|---|
| `vllm:num_requests_running{model_name}` | requests in the running batch (= `prefixserve_requests_running`) |
| `vllm:num_requests_waiting{model_name}` | requests queued (= `prefixserve_requests_waiting`) |
| `vllm:kv_cache_usage_perc{model_name}` | KV positions reserved, as a fraction 0..1 (vLLM's unit, despite the name) |
| `vllm:gpu_cache_usage_perc{model_name}` | the same, under the name older EPP releases read |
| `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` | value: scrape time |

The colons break our own naming rule on purpose: they are the names those routers look up.

Adapter names. The EPP matches a request's `model` (a task name here) against the comma lists of
`vllm:lora_requests_info` to prefer a pod whose device prefix cache already holds the task. `/metrics`
needs no key, so by default (`adapter_names="off"`) the lists stay empty and no task name is shown to
anyone (issue 13); `max_lora` is still exported. Operators opt in:

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

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

AdapterNames = Literal["off", "task", "tenant_task"]
ADAPTER_NAME_MODES: tuple[AdapterNames, ...] = ("off", "task", "tenant_task")


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
        if self.source is not None:
            try:
                running, waiting = self.source()
            except Exception:  # a scrape must never fail because the engine is mid-shutdown
                running, waiting = (), ()
        family = self._family()
        family.add_metric([str(self.max_value), self._names(running), self._names(waiting)], time.time())
        yield family


class VllmMetrics:
    """The vLLM-named series on `registry`, read from the engine at scrape time."""

    def __init__(
        self, registry: CollectorRegistry, model_name: str, max_lora: int, adapter_names: str
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
            "Running/waiting adapters (prefixserve: tasks) on this replica; value: unix time of the scrape.",
            ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
            max_lora,
            lambda label: adapter_name(label, adapter_names),
        )
        registry.register(self.lora_info)

    def bind_engine(self, engine: Any) -> None:
        m = self.model_name
        self.running.labels(model_name=m).set_function(lambda: float(engine.num_running))
        self.waiting.labels(model_name=m).set_function(lambda: float(engine.num_waiting))
        for gauge in (self.kv_usage, self.gpu_cache_usage):
            gauge.labels(model_name=m).set_function(lambda: float(engine.kv_usage_ratio))
        self.lora_info.source = lambda: (engine.running_tasks, engine.waiting_tasks)

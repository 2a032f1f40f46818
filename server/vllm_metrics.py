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
            "Adapters (prefixserve: tasks) resident on the device / loading, and how many the device holds;"
            " value: unix time of the scrape.",
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
        self.lora_info.source = lambda: residency_lists(engine)
        self.lora_info.max_source = lambda: int(engine.resident_prefix_capacity)


def residency_lists(engine: Any) -> tuple[list[str], list[str]]:
    """("tenant/task" labels resident on the device, those with requests whose prefix is not)."""
    resident = [f"{tenant}/{task}" for tenant, task in engine.resident_prefixes]
    wanted = set(engine.running_tasks) | set(engine.waiting_tasks)
    return resident, sorted(wanted - set(resident))

"""`server.metrics`: the exposed names are the documented contract, labels stay bounded."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prefix_store.uploads import ArtifactUploadChecks
from server.metrics import Metrics, TaskLabeler

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_names() -> set[str]:
    section = ARCHITECTURE.read_text().split("## Metrics", 1)[1]
    return set(re.findall(r"^\| `(prefixserve_[a-z0-9_]+)`", section, flags=re.M))


def scrape(metrics: Metrics, bind: object = None) -> dict[str, list]:
    if bind is not None:
        metrics.bind_engine(bind)
    text = generate_latest(metrics.registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_exposed_names_are_exactly_the_documented_table():
    assert set(Metrics().metric_names()) == documented_names()


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.observe_http("/v1/generate", 200)
    assert a.requests_total.labels(endpoint="/v1/generate", status="200")._value.get() == 1
    assert b.requests_total.labels(endpoint="/v1/generate", status="200")._value.get() == 0


def test_task_labels_are_bounded_top_n_and_sticky():
    labeler = TaskLabeler(top_n=2, tenants=["acme"])
    assert [labeler.task("acme", t) for t in ["a", "b", "c", "a", "c"]] == ["a", "b", "other", "a", "other"]
    assert labeler.task("acme", None) == "base"
    assert labeler.tenant("acme") == "acme" and labeler.tenant("mallory") == "other"


def test_task_allow_list_wins_over_top_n():
    labeler = TaskLabeler(allow=["keep"], top_n=100)
    assert labeler.task("t", "keep") == "keep" and labeler.task("t", "drop") == "other"


def test_engine_observer_and_scrape_time_gauges():
    m = Metrics(tenants=["acme"], max_tasks=8, top_tasks=20)
    engine = SimpleNamespace(
        num_running=3,
        num_waiting=1,
        healthy=True,
        kv_usage_ratio=0.25,
        running_tasks=["acme/sql", "acme/poems"],
        waiting_tasks=["acme/sql"],
        prefix_cache_bytes={"device": 1024, "host": 0}.__getitem__,
    )
    m.bind_engine(engine)
    m.on_step(batch_size=3, num_distinct_tasks=2, kv_usage_ratio=0.25)
    m.on_queue_time(0.01)
    m.on_first_token(0.05)
    m.on_token(0.002)
    m.on_finish("length", 5, 7, 0.2, "acme", "sql")
    m.on_cache_event("hit", "device")
    m.on_cache_event("miss", "store")
    m.on_cache_event("eviction", "host")
    m.on_prefix_load(0.03)
    for _ in range(3):
        m.observe_task_request("acme", "sql")
    m.observe_task_request("mallory", "x")
    m.observe_task_request("acme", "poems")  # served, so labelled: may be listed in task_requests_info
    samples = scrape(m)

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("prefixserve_requests_running") == 3 and value("prefixserve_requests_waiting") == 1
    assert value("prefixserve_engine_up") == 1 and value("prefixserve_kv_cache_usage_ratio") == 0.25
    assert value("prefixserve_prefix_cache_bytes", tier="device") == 1024
    assert value("prefixserve_request_finish", finish_reason="length") == 1
    assert value("prefixserve_generation_tokens") == 7 and value("prefixserve_prompt_tokens") == 5
    assert value("prefixserve_prefix_cache_hits", tier="device") == 1
    assert value("prefixserve_prefix_cache_misses") == 1
    assert value("prefixserve_task_requests", tenant="acme", task="sql") == 3
    assert value("prefixserve_task_requests", tenant="other", task="x") == 1
    info = samples["prefixserve_task_requests_info"][0]
    assert info.labels == {
        "running_tasks": "acme/poems,acme/sql",
        "waiting_tasks": "acme/sql",
        "max_tasks": "8",
    }
    engine.healthy = False
    assert scrape(m)["prefixserve_engine_up"][0].value == 0


def test_metrics_for_settings_is_built_once_with_tenants_labels_and_batch_size():
    import json

    from prefix_store.factory import make_store
    from server.api import create_app, metrics_for
    from server.settings import Settings

    keys = {"acme-manage-key": {"tenant": "acme", "role": "manage"}}
    settings = Settings(
        _env_file=None,
        model="tiny-gpt2",
        api_keys=json.dumps(keys),
        metrics_task_labels="keep",
        max_batch_size=4,
    )  # type: ignore[call-arg]
    m = metrics_for(settings)
    labeler = m.labeler
    assert labeler.tenant("acme") == "acme" and labeler.tenant("default") == "other"
    assert labeler.task("acme", "keep") == "keep" and labeler.task("acme", "drop") == "other"
    assert m.task_info.max_value == 4
    engine = SimpleNamespace(healthy=True, num_running=0, num_waiting=0, running_tasks=[], waiting_tasks=[])
    create_app(
        settings,
        engine=engine,
        store=make_store(None, Path("unused")),
        spec=SimpleNamespace(max_positions=64),
        uploads=ArtifactUploadChecks(),
        metrics=m,
    )  # type: ignore[arg-type]
    assert m.labeler is labeler  # the app uses the metrics it is given as they are


def test_task_names_are_private_by_default():
    # /metrics needs no key: without an allow-list or an explicit top-N, no task name is a label.
    m = Metrics(tenants=["acme"])
    m.observe_task_request("acme", "secret-task")
    m.bind_engine(_engine(running_tasks=["acme/secret-task"], waiting_tasks=["acme/other-secret"]))
    text = generate_latest(m.registry).decode()
    assert "secret" not in text
    assert scrape(m)["vllm:lora_requests_info"][0].labels["running_lora_adapters"] == ""


def _engine(**overrides):
    fields = dict(
        num_running=0, num_waiting=0, healthy=True, kv_usage_ratio=0.0, running_tasks=[], waiting_tasks=[],
        prefix_cache_bytes=lambda tier: 0, resident_prefixes=[], resident_prefix_capacity=0,
    )  # fmt: skip
    return SimpleNamespace(**(fields | overrides))


def test_vllm_named_gauges_follow_the_engine_with_adapter_names_by_mode():
    # Adapter lists are device residency (what the picker's affinity scorer needs), not requests:
    # globex/sql is resident with no request; acme/poems has a queued request while its prefix loads.
    engine = _engine(
        num_running=2, num_waiting=3, kv_usage_ratio=0.5,
        running_tasks=["acme/sql"], waiting_tasks=["acme/poems", "acme/sql"],
        resident_prefixes=[("acme", "sql"), ("globex", "sql")], resident_prefix_capacity=6,
    )  # fmt: skip
    expected = {
        "off": ("", ""),
        "task": ("sql", "poems"),  # the request's `model`, what the endpoint picker matches
        "tenant_task": ("acme/sql,globex/sql", "acme/poems"),  # never merged across tenants
    }
    for mode, (running, waiting) in expected.items():
        m = Metrics(model_name="gpt2", max_tasks=16, adapter_names=mode)
        m.bind_engine(engine)
        samples = scrape(m)
        assert samples["vllm:num_requests_running"][0].labels == {"model_name": "gpt2"}
        assert samples["vllm:num_requests_running"][0].value == 2
        assert samples["vllm:num_requests_waiting"][0].value == 3
        assert samples["vllm:kv_cache_usage_perc"][0].value == 0.5
        assert samples["vllm:gpu_cache_usage_perc"][0].value == 0.5
        info = samples["vllm:lora_requests_info"][0]
        assert info.labels == {
            "max_lora": "6", "running_lora_adapters": running, "waiting_lora_adapters": waiting,
        }, mode  # fmt: skip
        # prefixserve's own series keeps listing requests (bounded labels), not residency.
        assert samples["prefixserve_task_requests_info"][0].labels["max_tasks"] == "16"
    # Residency follows the engine at scrape time: evicted tasks leave the list.
    engine.resident_prefixes = [("globex", "sql")]
    info = scrape(Metrics(adapter_names="tenant_task"), bind=engine)["vllm:lora_requests_info"][0]
    assert info.labels["running_lora_adapters"] == "globex/sql"
    assert info.labels["waiting_lora_adapters"] == "acme/poems,acme/sql"


def test_unknown_adapter_name_mode_is_refused():
    import pytest

    with pytest.raises(ValueError, match="adapter_names"):
        Metrics(adapter_names="everything")


def test_probes_and_scrapes_are_not_counted_as_requests():
    # A draining pod answers /ready with 503: counting it would fire the 5xx alert.
    m = Metrics()
    for endpoint, status in (("/health", 200), ("/ready", 503), ("/metrics", 200), ("/v1/generate", 200)):
        m.observe_http(endpoint, status)
    counted = {s.labels["endpoint"] for s in scrape(m)["prefixserve_requests"] if s.name.endswith("_total")}
    assert counted == {"/v1/generate"}


def test_process_build_and_length_metrics():
    m = Metrics(version="1.2.3")
    m.on_finish("length", prompt_tokens=30, generated_tokens=7, e2e_seconds=90.0, tenant="t", task=None)
    samples = scrape(m)
    assert samples["process_resident_memory_bytes"][0].value > 0
    build = samples["prefixserve_build_info"][0]
    assert build.labels["version"] == "1.2.3" and build.value == 1

    def bucket(name: str, le: str) -> float:
        return next(s.value for s in samples[name] if s.name.endswith("_bucket") and s.labels["le"] == le)

    assert bucket("prefixserve_request_prompt_tokens", "20.0") == 0
    assert bucket("prefixserve_request_prompt_tokens", "50.0") == 1
    assert bucket("prefixserve_request_generation_tokens", "10.0") == 1
    # A 90 s generation lands between minute-scale buckets, not in +Inf.
    assert bucket("prefixserve_e2e_request_latency_seconds", "60.0") == 0
    assert bucket("prefixserve_e2e_request_latency_seconds", "120.0") == 1

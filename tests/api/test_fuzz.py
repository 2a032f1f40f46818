"""Property-based fuzzing of the OpenAPI spec with schemathesis: no 5xx, responses match the spec.

The app is served by uvicorn on a loopback port in a background thread (`serve_http_in_thread`: its
engine loop needs one long-lived event loop; schemathesis' synchronous calls would otherwise run the
app on a fresh loop per request). Bounded: ~30 examples per operation, no deadline, derandomized
for reproducible CI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from prefix_store.factory import make_store
from prefix_store.uploads import ArtifactUploadChecks
from server.api import create_app, metrics_for
from server.engine import EngineConfig
from server.limits import Limits
from server.settings import Settings
from tests.api.conftest import KEYS, artifact_bytes, build_test_engine, serve_http_in_thread

AUTH = {"Authorization": "Bearer acme-manage-key"}


@pytest.fixture(scope="module")
def fuzz_server(loaded, api_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running server with one task ("fuzz-task"); yields its base URL. On the vLLM pass its engine
    starts a vLLM core of its own: the server runs on another event loop than the shared core's."""
    root: Path = tmp_path_factory.mktemp("fuzz-store")
    s = Settings(
        _env_file=None, model="tiny-gpt2", local_store_dir=root, api_keys=json.dumps(KEYS), log_level="ERROR"
    )  # type: ignore[call-arg]
    store = make_store(None, root)
    metrics = metrics_for(s)
    engine = build_test_engine(
        loaded, api_model_dir, store, EngineConfig(Limits(max_batch_size=8, max_waiting=64)), metrics
    )
    app = create_app(
        s, engine=engine, store=store, spec=loaded.spec, uploads=ArtifactUploadChecks(), metrics=metrics
    )
    with serve_http_in_thread(app) as url:
        files = {"artifact": ("p.safetensors", artifact_bytes(loaded.spec, 3), "application/octet-stream")}
        r = httpx.post(f"{url}/v1/prefixes", data={"task": "fuzz-task"}, files=files, headers=AUTH)
        assert r.status_code == 201, r.text
        yield url


def _openapi() -> dict:
    """The app's OpenAPI document. It does not depend on the engine, so a stand-in is enough here
    (the schema is needed at collection time, before any fixture runs)."""
    from types import SimpleNamespace

    from modeling.model_spec import ModelSpec
    from modeling.models import build_config

    stand_in = SimpleNamespace(
        healthy=True, num_running=0, num_waiting=0, running_tasks=[], waiting_tasks=[], tokenizer=None
    )
    app = create_app(
        Settings(_env_file=None, model="tiny-gpt2"),  # type: ignore[call-arg]
        engine=stand_in,  # type: ignore[arg-type]
        store=make_store(None, Path("unused")),
        uploads=ArtifactUploadChecks(),
        spec=ModelSpec.from_config(build_config("tiny-gpt2")),
    )
    return app.openapi()


schema = schemathesis.openapi.from_dict(_openapi())
# The coverage phase (every boundary value of every field) is not bounded by max_examples and costs
# minutes on the generation routes; the fuzzing phase still draws boundary values among its examples.
schema.config.phases.coverage.enabled = False


def _bound_generation_length(body: object) -> None:
    """Cap generated lengths at 16 tokens to keep the run short; lengths that do not fit the model
    (422) are covered by the API tests, and the schema still lets everything else vary."""
    if not isinstance(body, dict):
        return
    params = body.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("max_new_tokens"), int):
        params["max_new_tokens"] = min(params["max_new_tokens"], 16)
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 16)


@schema.parametrize()
@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
def test_api_conforms_to_its_openapi_spec(case, fuzz_server):
    _bound_generation_length(case.body)
    response = case.call(base_url=fuzz_server, headers=AUTH, timeout=60)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


OTHER_CALLERS = {
    "no key": {},
    "unknown key": {"Authorization": "Bearer not-a-configured-key"},
    "generate-only key": {"Authorization": "Bearer acme-generate-key"},
}


@schema.parametrize()
@settings(
    max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
def test_every_route_answers_other_callers_without_a_5xx(case, fuzz_server):
    """The same routes for callers without a key, with a wrong key and with a key that may not manage:
    refusals (401/403, checked before the body is read) are never a 5xx."""
    _bound_generation_length(case.body)
    for name, headers in OTHER_CALLERS.items():
        response = case.call(base_url=fuzz_server, headers=headers, timeout=60)
        assert response.status_code < 500, (name, case.method, case.path, response.text[:300])

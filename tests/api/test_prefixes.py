"""Prefix management: upload (artifact and PEFT), versions, rollback, validation, tenants and roles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from tests.api.conftest import ACME, ACME_GEN, GLOBEX, artifact_bytes


async def _text_and_version(api, task: str, headers=ACME) -> tuple[str, int | None]:
    r = await api.generate("The quick brown fox", task=task, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"], r.json()["details"]["prefix_version"]


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_upload_generate_replace_rollback(make_api, loaded, backend):
    api = await make_api(redis=backend == "redis")
    base_text = (await api.generate("The quick brown fox")).json()["generated_text"]

    first = await api.upload("summarize", artifact_bytes(loaded.spec, seed=1))
    assert first.status_code == 201, first.text
    info = first.json()
    assert info["task"] == "summarize" and info["version"] == 1
    assert info["prefix_lengths"] == {"decoder": 4} and info["prefix_length"] == 4
    assert (
        info["num_parameters"]
        == loaded.spec.num_layers * 2 * loaded.spec.num_heads * 4 * loaded.spec.head_dim
    )
    assert len(info["sha256"]) == 64 and info["size_bytes"] > 0 and info["created_at"]
    text_v1, version = await _text_and_version(api, "summarize")
    assert version == 1 and text_v1 != base_text

    second = await api.upload("summarize", artifact_bytes(loaded.spec, seed=2))
    assert second.status_code == 201 and second.json()["version"] == 2
    text_v2, version = await _text_and_version(api, "summarize")
    assert version == 2 and text_v2 != text_v1

    rolled = await api.client.post("/v1/prefixes/summarize/rollback", json={"version": 1}, headers=ACME)
    assert rolled.status_code == 200 and rolled.json()["version"] == 1
    assert await _text_and_version(api, "summarize") == (text_v1, 1)

    described = (await api.client.get("/v1/prefixes/summarize", headers=ACME)).json()
    assert described["current_version"] == 1
    assert [v["version"] for v in described["versions"]] == [1, 2]

    missing = await api.client.post("/v1/prefixes/summarize/rollback", json={"version": 9}, headers=ACME)
    assert missing.status_code == 404

    deleted = await api.client.delete("/v1/prefixes/summarize", headers=ACME)
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await api.client.get("/v1/prefixes/summarize", headers=ACME)).status_code == 404
    r = await api.generate("x", task="summarize")
    assert r.status_code == 404


@pytest.fixture
def peft_files(tmp_path: Path, api_model_dir: Path) -> tuple[bytes, bytes]:
    from peft import PrefixTuningConfig, get_peft_model

    from modeling.models import load_model

    base = load_model(str(api_model_dir), device="cpu", trainable=True).model
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 3)
    model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


async def test_peft_upload_two_file_form(make_api, peft_files):
    api = await make_api()
    config_bytes, model_bytes = peft_files
    files = {
        "adapter_config": ("adapter_config.json", config_bytes, "application/json"),
        "adapter_model": ("adapter_model.safetensors", model_bytes, "application/octet-stream"),
    }
    r = await api.client.post("/v1/prefixes", data={"task": "from-peft"}, files=files, headers=ACME)
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "peft" and r.json()["prefix_length"] == 6
    text, version = await _text_and_version(api, "from-peft")
    assert version == 1 and text


async def test_bad_uploads_are_422_naming_the_problem(make_api, loaded, peft_files):
    api = await make_api(max_artifact_bytes=64 * 1024)
    good = artifact_bytes(loaded.spec, 1)
    wrong_heads = st_save({"decoder.0.key": torch.zeros(3, 4, 16), "decoder.0.value": torch.zeros(3, 4, 16)})
    cases = {
        "pickle": (b"\x80\x04\x95" + b"\x00" * 64, "pickle"),
        "zip checkpoint": (b"PK\x03\x04" + b"\x00" * 64, "pickle"),
        "garbage": (b"\x10\x00\x00\x00\x00\x00\x00\x00not json here!!!", "JSON"),
        "wrong shape": (wrong_heads, "layers"),
        "too large": (b"\x00" * (65 * 1024), "limit"),
    }
    for name, (data, needle) in cases.items():
        r = await api.upload("task-a", data)
        assert r.status_code == 422, (name, r.text)
        assert needle.lower() in r.json()["error"].lower(), (name, r.json())
    config_bytes, _ = peft_files
    both = {
        "artifact": ("a.safetensors", good, "application/octet-stream"),
        "adapter_config": ("adapter_config.json", config_bytes, "application/json"),
    }
    r = await api.client.post("/v1/prefixes", data={"task": "t"}, files=both, headers=ACME)
    assert r.status_code == 422 and "not both" in r.json()["error"]
    half = {"adapter_config": ("adapter_config.json", config_bytes, "application/json")}
    r = await api.client.post("/v1/prefixes", data={"task": "t"}, files=half, headers=ACME)
    assert r.status_code == 422 and "adapter_model" in r.json()["error"]
    pickled_peft = {**half, "adapter_model": ("adapter_model.bin", b"\x80\x04\x95" + b"\x00" * 64, "x")}
    r = await api.client.post("/v1/prefixes", data={"task": "t"}, files=pickled_peft, headers=ACME)
    assert r.status_code == 422 and "pickle" in r.json()["error"]
    r = await api.client.post("/v1/prefixes", data={"task": "t"}, headers=ACME)
    assert r.status_code == 422
    for bad_name in ["a/b", "..", ".hidden", "x" * 65, "bad\x01name", "sp ace", ""]:
        r = await api.upload(bad_name, good)
        assert r.status_code == 422, (bad_name, r.text)
    listing = (await api.client.get("/v1/prefixes", headers=ACME)).json()
    assert listing["items"] == []  # nothing invalid was stored


async def test_pagination(make_api, loaded):
    api = await make_api()
    for name in ["alpha", "bravo", "charlie"]:
        assert (await api.upload(name, artifact_bytes(loaded.spec, 1))).status_code == 201
    page1 = (await api.client.get("/v1/prefixes", params={"limit": 2}, headers=ACME)).json()
    assert [i["task"] for i in page1["items"]] == ["alpha", "bravo"] and page1["next_cursor"]
    page2 = (
        await api.client.get(
            "/v1/prefixes", params={"limit": 2, "cursor": page1["next_cursor"]}, headers=ACME
        )
    ).json()
    assert [i["task"] for i in page2["items"]] == ["charlie"] and page2["next_cursor"] is None
    assert (await api.client.get("/v1/prefixes", params={"limit": 0}, headers=ACME)).status_code == 422


async def test_a_task_named_like_the_served_model_is_refused(make_api, loaded):
    """`model` in /v1/completions names either the base model or a task: a task with the base model's
    id could never be reached there, so its upload is refused."""
    api = await make_api(served_model_name="house-model")
    r = await api.upload("house-model", artifact_bytes(loaded.spec, 1))
    assert r.status_code == 422, r.text
    assert "served model" in r.json()["error"] and "/v1/completions" in r.json()["error"]
    assert (await api.client.get("/v1/prefixes", headers=ACME)).json()["items"] == []
    assert (await api.upload("tiny-gpt2", artifact_bytes(loaded.spec, 1))).status_code == 201
    default_id = await make_api()  # without served_model_name the id is the model's name
    assert (await default_id.upload("tiny-gpt2", artifact_bytes(loaded.spec, 1))).status_code == 422


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_tenants_never_see_each_others_tasks(make_api, loaded, backend):
    api = await make_api(redis=backend == "redis")
    assert (await api.upload("secret", artifact_bytes(loaded.spec, 1), headers=ACME)).status_code == 201
    before = (await api.client.get("/v1/prefixes/secret", headers=ACME)).json()

    listing = (await api.client.get("/v1/prefixes", headers=GLOBEX)).json()
    assert listing["items"] == []
    models = (await api.client.get("/v1/models", headers=GLOBEX)).json()
    assert "secret" not in [m["id"] for m in models["data"]]
    for method, url, kwargs in [
        ("GET", "/v1/prefixes/secret", {}),
        ("DELETE", "/v1/prefixes/secret", {}),
        ("POST", "/v1/prefixes/secret/rollback", {"json": {"version": 1}}),
        ("POST", "/v1/generate", {"json": {"task": "secret", "inputs": "x"}}),
        ("POST", "/v1/completions", {"json": {"model": "secret", "prompt": "x"}}),
    ]:
        r = await api.client.request(method, url, headers=GLOBEX, **kwargs)
        assert r.status_code == 404, (method, url, r.text)
        error = r.json()["error"]  # OpenAI's nested shape on /v1/completions, ours elsewhere
        assert (error["type"] if isinstance(error, dict) else r.json()["error_type"]) == "not_found"

    # Globex may use the same name: it gets its own task; Acme's is untouched.
    mine = await api.upload("secret", artifact_bytes(loaded.spec, 2), headers=GLOBEX)
    assert mine.status_code == 201 and mine.json()["version"] == 1
    after = (await api.client.get("/v1/prefixes/secret", headers=ACME)).json()
    assert after == before
    acme_models = (await api.client.get("/v1/models", headers=ACME)).json()
    assert [m["id"] for m in acme_models["data"]][1:] == ["secret"]


async def test_roles_and_keys(make_api, loaded):
    api = await make_api()
    data = artifact_bytes(loaded.spec, 1)
    assert (await api.upload("t1", data, headers=ACME)).status_code == 201
    denied = await api.upload("t2", data, headers=ACME_GEN)
    assert denied.status_code == 403 and denied.json()["error_type"] == "forbidden"
    assert (await api.client.delete("/v1/prefixes/t1", headers=ACME_GEN)).status_code == 403
    rb = await api.client.post("/v1/prefixes/t1/rollback", json={"version": 1}, headers=ACME_GEN)
    assert rb.status_code == 403
    assert (await api.client.get("/v1/prefixes", headers=ACME_GEN)).status_code == 200
    assert (await api.generate("hi", task="t1", headers=ACME_GEN)).status_code == 200

    for headers in [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "Basic abc"}]:
        r = await api.client.post("/v1/generate", json={"inputs": "x"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error_type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert (await api.client.get("/v1/prefixes")).status_code == 401


async def test_single_tenant_mode_needs_no_key(make_api, loaded):
    api = await make_api(keys=None)
    assert (await api.upload("solo", artifact_bytes(loaded.spec, 1), headers={})).status_code == 201
    r = await api.client.post("/v1/generate", json={"task": "solo", "inputs": "x"})
    assert r.status_code == 200


async def test_a_raw_store_failure_is_500_without_its_internal_details(make_api, loaded):
    """A store failure that is not "unavailable" (disk full, corrupt blob) is logged in full, but the
    client gets neither file paths nor Redis internals."""
    from prefix_store.base import StoreError

    api = await make_api()

    async def put(*args, **kwargs):
        raise StoreError(
            "local prefix store put failed: [Errno 28] No space left: '/srv/store/acme/t/v1.json'"
        )

    api.store.put = put  # type: ignore[method-assign]
    r = await api.upload("t", artifact_bytes(loaded.spec, 1))
    assert r.status_code == 500, r.text
    assert r.json()["error_type"] == "store_error"
    assert "/srv/store" not in r.text and "Errno" not in r.text

"""Crafted uploads against a real server process: each malformed artifact or PEFT adapter is a 4xx, the
store (as the API shows it and as files on disk) is left exactly as it was, and a header built to burn
CPU (50,000 dims of 10**18) neither stalls the server nor crashes the request.

Every case here was a 500 (or, for `decoder.00.key`, a 201 storing an unchecked tensor) before the
artifact header was parsed with bounded integers, exact ASCII names and bounded rank/dims.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME, ServerProcess, generate, upload

pytestmark = pytest.mark.timeout(300)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def renamed(data: bytes, old: str, new: str) -> bytes:
    header, body = split(data)
    header[new] = header.pop(old)
    return join(header, body)


def store_snapshot(server: ServerProcess, client: httpx.Client) -> Any:
    """What a user sees (listing, the kept task's versions) and what lies on disk (paths and bytes)."""
    root = Path(server.env["PREFIXSERVE_LOCAL_STORE_DIR"])
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    listing = client.get("/v1/prefixes", headers=ACME).json()
    detail = client.get("/v1/prefixes/keep", headers=ACME).json()
    return listing, detail, files


def crafted_cases(valid: bytes) -> dict[str, bytes]:
    header, body = split(valid)
    meta = header["__metadata__"]
    entry = header["decoder.0.key"]
    cases: dict[str, bytes] = {}
    # A 977 KiB header (under the 1 MiB header limit): a shape of 50,000 dims of 10**18; math.prod over
    # it held the GIL for seconds, and the error message could not be formatted (a 500).
    cases["shape of 50,000 dims of 10**18"] = join(
        {**header, "decoder.0.key": {**entry, "shape": [10**18] * 50_000}}, body
    )
    cases["tensor name ending in a newline"] = renamed(valid, "decoder.0.key", "decoder.0.key\n")
    cases["layer number in non-ASCII digits"] = renamed(valid, "decoder.1.value", "decoder.\u0661.value")
    cases["layer number with a leading zero"] = renamed(valid, "decoder.1.value", "decoder.01.value")
    big = "9" * 5000
    text = json.dumps(header).replace(json.dumps(entry["data_offsets"]), f"[0, {big}]", 1)
    cases["header integer of 5,000 digits"] = join(text, body)
    cases["training metadata integer of 5,000 digits"] = join(
        {**header, "__metadata__": {**meta, "training": '{"steps": ' + big + "}"}}, body
    )
    cases["training metadata nested 100,000 deep"] = join(
        {**header, "__metadata__": {**meta, "training": "[" * 100_000 + "]" * 100_000}}, body
    )
    cases["format_version in non-ASCII digits"] = join(
        {**header, "__metadata__": {**meta, "format_version": "\u0661"}}, body
    )
    # An extra tensor beside a complete valid set: it used to be stored unchecked.
    start, end = entry["data_offsets"]
    extra = {**header, "decoder.00.key": {**entry, "data_offsets": [len(body), len(body) + end - start]}}
    cases["extra tensor decoder.00.key"] = join(extra, body + body[start:end])
    return cases


def peft_upload(client: httpx.Client, task: str, config: dict[str, Any], model: bytes) -> httpx.Response:
    files = {
        "adapter_config": ("adapter_config.json", json.dumps(config).encode(), "application/json"),
        "adapter_model": ("adapter_model.safetensors", model, "application/octet-stream"),
    }
    return client.post("/v1/prefixes", data={"task": task}, files=files, headers=ACME)


def test_crafted_artifacts_are_4xx_and_leave_the_store_unchanged(spawn_server, loaded):
    server = spawn_server(max_artifact_bytes=2 << 20, max_body_bytes=4 << 20)
    spec = loaded.spec
    with server.client(timeout=120) as client:
        assert upload(client, "keep", artifact_bytes(spec, 1)).status_code == 201
        expected = generate(client, "keep").json()["generated_text"]
        before = store_snapshot(server, client)
        for name, data in crafted_cases(artifact_bytes(spec, 2)).items():
            for task in ("evil", "keep"):  # a new task, and a new version of an existing one
                r = upload(client, task, data)
                assert r.status_code == 422, (name, task, r.status_code, r.text[:300])
                assert r.json()["error_type"] == "validation", (name, r.text[:300])
                assert len(r.text) < 2000, (name, "the error quotes the hostile input at length")
                assert store_snapshot(server, client) == before, name
        assert generate(client, "keep").json()["generated_text"] == expected


def test_crafted_header_does_not_stall_the_server(spawn_server, loaded):
    server = spawn_server(max_artifact_bytes=2 << 20, max_body_bytes=4 << 20)
    data = crafted_cases(artifact_bytes(loaded.spec, 2))["shape of 50,000 dims of 10**18"]
    with server.client(timeout=120) as client:
        assert client.get("/health").status_code == 200
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with server.client(timeout=60) as c:
                while not done.is_set():
                    start = time.monotonic()
                    assert c.get("/health").status_code == 200
                    latencies.append(time.monotonic() - start)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            statuses = [upload(client, "evil", data).status_code for _ in range(3)]
        finally:
            done.set()
            prober.join(timeout=60)
        assert statuses == [422, 422, 422]
        assert latencies and max(latencies) < 1.0, (max(latencies), server.log_tail())


def test_malformed_peft_configs_are_4xx_and_leave_the_store_unchanged(spawn_server, loaded):
    from prefix_store.artifact import load_artifact
    from prefix_store.peft_format import artifact_to_peft

    server = spawn_server()
    spec = loaded.spec
    config_bytes, model = artifact_to_peft(load_artifact(artifact_bytes(spec, 3), spec), spec)
    config = json.loads(config_bytes)
    with server.client(timeout=120) as client:
        assert peft_upload(client, "keep", config, model).status_code == 201  # the valid adapter
        before = store_snapshot(server, client)
        bad = {
            "num_transformer_submodules as a string": {**config, "num_transformer_submodules": "two"},
            "num_transformer_submodules as a list": {**config, "num_transformer_submodules": [2]},
            "num_transformer_submodules as true": {**config, "num_transformer_submodules": True},
            "num_transformer_submodules of 3": {**config, "num_transformer_submodules": 3},
            "num_layers as true": {**config, "num_layers": True},
            "num_layers of 10**18": {**config, "num_layers": 10**18},
            "base_model_name_or_path as an object": {**config, "base_model_name_or_path": {"a": [1] * 100}},
        }
        for name, cfg in bad.items():
            r = peft_upload(client, "keep", cfg, model)
            assert r.status_code == 422, (name, r.status_code, r.text[:300])
            assert store_snapshot(server, client) == before, name
        huge_int = json.dumps(config).replace('"num_layers": 2', '"num_layers": ' + "9" * 5000)
        files = {
            "adapter_config": ("adapter_config.json", huge_int.encode(), "application/json"),
            "adapter_model": ("adapter_model.safetensors", model, "application/octet-stream"),
        }
        r = client.post("/v1/prefixes", data={"task": "keep"}, files=files, headers=ACME)
        assert r.status_code == 422, r.text[:300]
        assert store_snapshot(server, client) == before

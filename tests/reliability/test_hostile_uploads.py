"""Hostile prefix uploads: each is refused with a 4xx naming the problem, the store is left exactly as it
was, and nothing uploaded is ever unpickled or executed.

In-process app (real engine, real local store) so the test can also prove that no unpickler runs."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from prefix_store.artifact import dump_artifact, new_artifact
from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import ACME

pytestmark = pytest.mark.timeout(120)


class _Marker:
    """A pickle payload whose loading creates a file (the classic `__reduce__` code-execution trick)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _raw_safetensors(header: str | dict[str, Any], data: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _tensors(spec: Any, layers: int | None = None, heads: int | None = None, length: int = 4, **kw: Any):
    """Per-layer key/value tensors shaped for `spec`, with any dimension overridden."""
    layers = spec.num_layers if layers is None else layers
    heads = spec.num_heads if heads is None else heads
    head_dim = kw.get("head_dim", spec.head_dim)
    dtype = kw.get("dtype", torch.float32)
    out = {}
    for i in range(layers):
        for part in ("key", "value"):
            out[f"decoder.{i}.{part}"] = torch.randn(heads, length, head_dim).to(dtype)
    return out


async def _snapshot(api) -> Any:
    """What a user sees of the store: the task list and every kept version of the existing task."""
    listing = (await api.client.get("/v1/prefixes", headers=ACME)).json()
    detail = (await api.client.get("/v1/prefixes/keep", headers=ACME)).json()
    return listing, detail


async def test_hostile_artifacts_are_refused_and_the_store_is_unchanged(
    make_api, loaded, tmp_path, monkeypatch
):
    spec = loaded.spec
    api = await make_api(max_artifact_bytes=1 << 20, max_body_bytes=2 << 20)
    assert (await api.upload("keep", artifact_bytes(spec, 1))).status_code == 201
    before = await _snapshot(api)
    sample = artifact_bytes(spec, 2)
    valid_meta = json.loads(sample[8 : 8 + struct.unpack("<Q", sample[:8])[0]])["__metadata__"]

    # Nothing may unpickle: any call to an unpickler during these uploads fails the test.
    unpickled: list[str] = []

    def refuse(name: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            unpickled.append(name)
            raise AssertionError(f"{name} called on an upload")

        return call

    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))

    marker = tmp_path / "pwned"
    evil_pickle = pickle.dumps(_Marker(marker))
    torch_ckpt = tmp_path / "ckpt.pt"
    torch.save(_tensors(spec), torch_ckpt)  # a zip of pickles, what `torch.save` writes
    valid = artifact_bytes(spec, 3)
    one = torch.zeros(4, 4, 16).numpy().tobytes()

    def st(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
        return safetensors.torch.save(tensors, metadata=valid_meta if metadata is None else metadata)

    nan = _tensors(spec)
    nan["decoder.1.value"][0, 0, 0] = float("nan")
    inf = _tensors(spec)
    inf["decoder.0.key"][1, 2, 3] = float("inf")
    other_model = dataclasses.replace(spec, fingerprint="f" * len(spec.fingerprint))
    g = torch.Generator().manual_seed(0)
    foreign = dump_artifact(
        new_artifact({"decoder": torch.randn(spec.num_layers, 2, spec.num_heads, 4, spec.head_dim, generator=g)},
                     other_model)
    )  # fmt: skip
    cases: dict[str, tuple[bytes, str]] = {
        "raw pickle with __reduce__": (evil_pickle, "pickle"),
        "torch.save checkpoint": (torch_ckpt.read_bytes(), "pickle"),
        "truncated": (valid[: len(valid) - 100], "offset"),
        "truncated header": (valid[:5], "8-byte header"),
        "header length claims 2**60 bytes": (struct.pack("<Q", 1 << 60) + b"{}", "header"),
        "huge tensor shape": (
            _raw_safetensors(
                {
                    "decoder.0.key": {
                        "dtype": "F32",
                        "shape": [1 << 20, 1 << 20, 16],
                        "data_offsets": [0, 256],
                    }
                },
                b"\0" * 256,
            ),  # fmt: skip
            "shape",
        ),
        "offsets past the end": (
            _raw_safetensors(
                {"decoder.0.key": {"dtype": "F32", "shape": [4, 4, 16], "data_offsets": [0, 1 << 30]}}, one
            ),  # fmt: skip
            "offset",
        ),
        "duplicate tensor names": (
            _raw_safetensors(
                '{"decoder.0.key": {"dtype": "F32", "shape": [4, 4, 16], "data_offsets": [0, 1024]},'
                ' "decoder.0.key": {"dtype": "F32", "shape": [4, 4, 16], "data_offsets": [1024, 2048]}}',
                one + one,
            ),
            "duplicate",
        ),
        "unexpected tensor name": (st({**_tensors(spec), "lm_head.weight": torch.zeros(2, 2)}), "unexpected"),
        "wrong layer count": (st(_tensors(spec, layers=spec.num_layers + 1)), "layers"),
        "wrong heads": (st(_tensors(spec, heads=spec.num_heads + 1)), "heads"),
        "wrong head_dim": (st(_tensors(spec, head_dim=spec.head_dim * 2)), "head_dim"),
        "prefix length over the limit": (st(_tensors(spec, length=600)), "prefix length"),
        "zero prefix length": (st(_tensors(spec, length=0)), "prefix length"),
        "wrong dtype (F64)": (st(_tensors(spec, dtype=torch.float64)), "dtype"),
        "wrong dtype (I32)": (st(_tensors(spec, dtype=torch.int32)), "dtype"),
        "NaN": (st(nan), "nan"),
        "Inf": (st(inf), "inf"),
        "another base model": (foreign, "fingerprint"),
        "empty": (b"", "empty"),
    }
    for name, (data, needle) in cases.items():
        r = await api.upload("evil", data)
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert needle.lower() in r.json()["error"].lower(), (name, r.json())
        assert await _snapshot(api) == before, name
        # Replacing an existing task with a bad artifact must not move its current version either.
        r = await api.upload("keep", data)
        assert r.status_code == 422, (name, r.text)
        assert await _snapshot(api) == before, name

    # The same payloads as a PEFT adapter: a pickled adapter_model and a config of another peft_type.
    lora_config = json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["c_attn"]}).encode()
    prefix_config = json.dumps(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": spec.num_layers,
         "num_attention_heads": spec.num_heads, "token_dim": spec.num_heads * spec.head_dim}
    ).encode()  # fmt: skip
    peft_cases = {
        "PEFT config of another peft_type": (
            lora_config,
            st({"prompt_embeddings": torch.zeros(4, 8)}),
            "LORA",
        ),
        "PEFT adapter_model.bin pickle": (prefix_config, evil_pickle, "pickle"),
        "PEFT torch.save adapter": (prefix_config, torch_ckpt.read_bytes(), "pickle"),
    }
    for name, (config, model, needle) in peft_cases.items():
        files = {
            "adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_model": ("adapter_model.bin", model, "application/octet-stream"),
        }
        r = await api.client.post("/v1/prefixes", data={"task": "evil"}, files=files, headers=ACME)
        assert r.status_code == 422, (name, r.text)
        assert needle.lower() in r.json()["error"].lower(), (name, r.json())
        assert await _snapshot(api) == before, name

    assert not marker.exists(), "an uploaded pickle was executed"
    assert unpickled == []
    # The server still accepts and serves a good upload afterwards.
    monkeypatch.undo()
    assert (await api.upload("keep", valid)).status_code == 201
    assert (await api.generate("hi", task="keep")).status_code == 200


async def test_hostile_task_names_and_oversized_bodies(make_api, loaded):
    spec = loaded.spec
    api = await make_api(max_body_bytes=64 * 1024, max_artifact_bytes=48 * 1024)
    good = artifact_bytes(spec, 1)
    assert (await api.upload("keep", good)).status_code == 201
    before = await _snapshot(api)
    names = ["a/b", "../keep", "..\\keep", "/abs", "a\\b", "tab\there", "nul\x00x", "bell\x07", "new\nline",
             "x" * 65, ".hidden", "-dash", "sp ace", "a:b", "ünïcode", ""]  # fmt: skip
    for name in names:
        r = await api.upload(name, good)
        assert r.status_code == 422, (repr(name), r.status_code, r.text)
        assert r.json()["error_type"] == "validation"
        assert await _snapshot(api) == before, repr(name)
    # Path-like names in the URL of management routes are not found or refused, never resolved.
    for path in ["/v1/prefixes/..%2Fkeep", "/v1/prefixes/%2E%2E", "/v1/prefixes/" + "x" * 65]:
        r = await api.client.delete(path, headers=ACME)
        assert r.status_code in (404, 422), (path, r.status_code, r.text)
        assert await _snapshot(api) == before, path

    # A body over max_body_bytes: 413 from the declared length...
    big = b"\0" * (80 * 1024)
    r = await api.upload("big", big)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large", r.text
    # ...and from the streamed count when the client sends no Content-Length (chunked).
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="artifact"; filename="a.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    async def chunks():
        yield head
        for _ in range(20):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    r = await api.client.post(
        "/v1/prefixes",
        content=chunks(),
        headers={**ACME, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    # Under the body limit but over the artifact limit: 422 naming the limit.
    r = await api.upload("big", b"\0" * (50 * 1024))
    assert r.status_code == 422 and "limit" in r.json()["error"], r.text
    assert await _snapshot(api) == before
    assert (await api.generate("hi", task="keep")).status_code == 200

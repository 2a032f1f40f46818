"""The prefix artifact: exact round trips, and every kind of bad file refused with a message naming it."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from modeling.model_spec import ModelSpec
from prefix_store.artifact import (
    ArtifactError,
    dump_artifact,
    load_artifact,
    new_artifact,
)
from server.limits import Limits

SPEC = ModelSpec(
    kind="decoder-only",
    model_type="gpt2",
    num_layers=2,
    num_heads=4,
    head_dim=16,
    hidden_size=64,
    vocab_size=50257,
    max_positions=512,
    weights_digest="abc",
).with_fingerprint()
BART_SPEC = ModelSpec(
    kind="encoder-decoder",
    model_type="bart",
    num_layers=2,
    num_heads=4,
    head_dim=16,
    hidden_size=64,
    vocab_size=50265,
    max_positions=512,
    num_encoder_layers=3,
    num_encoder_heads=4,
).with_fingerprint()


def _prefix(layers=2, heads=4, length=5, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, length, dim, generator=g).to(dtype)


def _raw(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    return st_save(tensors, metadata={"format": "prefixserve.prefix", **meta})


def _good_tensors(length=5) -> dict[str, torch.Tensor]:
    p = _prefix(length=length)
    return {
        f"decoder.{i}.{part}": p[i, j].contiguous()
        for i in range(2)
        for j, part in enumerate(("key", "value"))
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    artifact = new_artifact({"decoder": _prefix(dtype=dtype)}, SPEC, task="e2e", training={"lr": 8e-5})
    data = dump_artifact(artifact)
    back = load_artifact(data, SPEC)
    assert torch.equal(back.prefixes["decoder"], artifact.prefixes["decoder"])
    assert back.prefixes["decoder"].dtype == dtype
    assert back.metadata.task == "e2e" and back.metadata.training == {"lr": 8e-5}
    assert back.metadata.model_fingerprint == SPEC.fingerprint
    assert dump_artifact(back) == data  # a second save is byte-identical


def test_encoder_decoder_kinds_with_their_own_lengths():
    prefixes = {
        "encoder": _prefix(layers=3, length=7),
        "decoder": _prefix(length=3),
        "cross": _prefix(length=11),
    }
    back = load_artifact(dump_artifact(new_artifact(prefixes, BART_SPEC, task="xsum")), BART_SPEC)
    assert back.prefix_lengths == {"encoder": 7, "decoder": 3, "cross": 11}
    for kind, tensor in prefixes.items():
        assert torch.equal(back.prefixes[kind], tensor)


def _bad_cases() -> dict[str, tuple[bytes, str]]:
    good = _good_tensors()
    wrong_name = dict(good)
    wrong_name["decoder.0.query"] = wrong_name.pop("decoder.0.key")
    one_layer = {k: v for k, v in good.items() if k.startswith("decoder.0.")}
    three_layers = {
        **good,
        "decoder.2.key": good["decoder.0.key"].clone(),
        "decoder.2.value": good["decoder.0.value"].clone(),
    }
    nan = dict(good)
    nan["decoder.1.value"] = good["decoder.1.value"].clone()
    nan["decoder.1.value"][0, 0, 0] = float("nan")
    inf = dict(good)
    inf["decoder.0.key"] = good["decoder.0.key"].clone()
    inf["decoder.0.key"][1, 1, 1] = float("inf")
    long_prefix = _good_tensors(length=600)
    header_huge = struct.pack("<Q", 10**12) + b"{}"
    valid = _raw(good)
    (header_len,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8 : 8 + header_len])
    header["decoder.0.key"]["data_offsets"] = [0, 10**9]
    blob = json.dumps(header).encode()
    past_end = struct.pack("<Q", len(blob)) + blob + valid[8 + header_len :]
    dup_header = valid[8 : 8 + header_len].decode()
    dup_entry = json.dumps({"decoder.0.key": header["decoder.0.value"]})[1:-1]
    dup_blob = ("{" + dup_entry + "," + dup_header[1:]).encode()
    duplicate = struct.pack("<Q", len(dup_blob)) + dup_blob + valid[8 + header_len :]
    return {
        "wrong names": (_raw(wrong_name), "unexpected tensor name 'decoder.0.query'"),
        "missing layer": (_raw(one_layer), "1 layers, the model has 2"),
        "extra layer": (_raw(three_layers), "3 layers, the model has 2"),
        "wrong heads": (_raw({k: v[:2] for k, v in good.items()}), "2 heads, the model has 4"),
        "wrong head_dim": (_raw({k: v[..., :8].contiguous() for k, v in good.items()}), "head_dim 8"),
        "wrong rank": (_raw({k: v[0] for k, v in good.items()}), "must be [heads, prefix_length, head_dim]"),
        "unsupported dtype": (_raw({k: v.double() for k, v in good.items()}), "dtype F64 not supported"),
        "integer dtype": (_raw({k: v.to(torch.int32) for k, v in good.items()}), "dtype I32 not supported"),
        "NaN": (_raw(nan), "NaN or Inf"),
        "Inf": (_raw(inf), "NaN or Inf"),
        "fingerprint": (_raw(good, model_fingerprint="0" * 32), "model fingerprint"),
        "too long for limits": (_raw(long_prefix), "prefix length 600 exceeds the limit 512"),
        "pickle": (pickle.dumps({"decoder.0.key": [1.0]}), "pickle"),
        "torch zip checkpoint": (b"PK\x03\x04" + b"\0" * 64, "pickle/torch checkpoint"),
        "truncated": (valid[: len(valid) // 2], "run past the end"),
        "tiny": (b"\x01\x02", "shorter than its 8-byte header"),
        "huge header claim": (header_huge, "header claims"),
        "offsets past end": (past_end, "run past the end"),
        "duplicate names": (duplicate, "duplicate tensor name 'decoder.0.key'"),
        "not json": (struct.pack("<Q", 4) + b"\xff\xfe{]", "not valid JSON"),
        "mixed dtypes": (_raw({**good, "decoder.1.key": good["decoder.1.key"].half()}), "share one dtype"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_invalid_artifact_is_refused_with_a_message_naming_the_problem(case):
    data, message = _bad_cases()[case]
    with pytest.raises(ArtifactError, match=None) as info:
        load_artifact(data, SPEC, Limits())  # the server's default limits
    assert message in str(info.value), str(info.value)


def test_oversized_file_is_refused_before_parsing():
    data = dump_artifact(new_artifact({"decoder": _prefix()}, SPEC))
    with pytest.raises(ArtifactError, match=f"{len(data)} bytes; the limit is 1000"):
        load_artifact(data, SPEC, Limits(max_artifact_bytes=1000))


def test_prefix_that_leaves_no_room_in_the_positions_is_refused():
    small = ModelSpec(**{**SPEC.to_dict(), "max_positions": 8, "fingerprint": ""}).with_fingerprint()
    data = dump_artifact(new_artifact({"decoder": _prefix()}, SPEC))
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_artifact(data, small)
    unsigned = _raw(_good_tensors(length=8))
    with pytest.raises(
        ArtifactError, match="decoder prefix length 8 leaves no room in the model's 8 positions"
    ):
        load_artifact(unsigned, small)


def test_kinds_that_do_not_apply_to_the_model_are_refused():
    data = _raw({"encoder.0.key": torch.zeros(4, 2, 16), "encoder.0.value": torch.zeros(4, 2, 16)})
    with pytest.raises(ArtifactError, match="prefix kind 'encoder' does not apply to a decoder-only model"):
        load_artifact(data, SPEC)


def test_new_artifact_refuses_what_the_server_would_refuse():
    with pytest.raises(ArtifactError, match="3 heads"):
        new_artifact({"decoder": _prefix(heads=3)}, SPEC)


@pytest.mark.parametrize("task_name_length", range(0, 300, 7))
def test_valid_artifacts_are_accepted_whatever_their_header_length(task_name_length):
    # The header length's low byte can be 0x80 (a pickle opcode) or "PK": that alone must not refuse a file.
    artifact = new_artifact({"decoder": _prefix()}, SPEC, task="t" * task_name_length)
    data = dump_artifact(artifact)
    assert load_artifact(data, SPEC).metadata.task == "t" * task_name_length


def _with_entry(field: str, value: object) -> bytes:
    valid = _raw(_good_tensors())
    (header_len,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8 : 8 + header_len])
    header["decoder.0.key"][field] = value
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + valid[8 + header_len :]


@pytest.mark.parametrize(
    "data",
    [
        _with_entry("data_offsets", "ab"),
        _with_entry("data_offsets", [0]),
        _with_entry("data_offsets", [0, "64"]),
        _with_entry("data_offsets", None),
        _with_entry("shape", "4"),
        _raw(_good_tensors(), format_version="one"),
    ],
    ids=["offsets string", "one offset", "offset string", "offsets null", "shape string", "format_version"],
)
def test_malformed_header_fields_raise_artifact_error_not_a_crash(data):
    # A TypeError / plain ValueError here would be a 500 at upload instead of a 422 naming the field.
    with pytest.raises(ArtifactError):
        load_artifact(data, SPEC)

"""The prefix artifact: the unit that is trained, uploaded, stored and served.

A safetensors file (never pickle) holding, for each place a prefix goes, one key and one value tensor
per layer, each `[num_heads, L, head_dim]`:

    decoder.{i}.key / decoder.{i}.value   decoder self-attention (GPT-2: the only kind)
    encoder.{i}.key / encoder.{i}.value   encoder self-attention (encoder-decoder models)
    cross.{i}.key   / cross.{i}.value     decoder cross-attention, prepended to the encoder's keys/values

and string metadata in the safetensors header (see docs/prefix-format.md). In memory each kind is one
tensor `[num_layers, 2, H, L, D]` (index 0 of dim 1 = key, 1 = value).

`load_artifact` checks everything before any tensor is built: the 8-byte header length, the header
JSON (no duplicate names), names, dtypes, shapes and byte offsets against the buffer, then (with a
`ModelSpec`) layer counts, heads, head_dim, prefix length against the model's positions, and the
model fingerprint; finally that every value is finite. Each failure raises `ArtifactError` with a
message that names the problem.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import load as st_load

from modeling.model_spec import ModelSpec
from prefix_store.artifact_types import ArtifactError, ArtifactLimits

FORMAT_NAME = "prefixserve.prefix"
FORMAT_VERSION = 1
PREFIX_KINDS = ("decoder", "encoder", "cross")

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
# Names are exact ASCII: `fullmatch` (a `$` would accept a trailing newline), layer numbers in ASCII
# digits without leading zeros (so `decoder.00.key` cannot stand beside `decoder.0.key` unchecked).
_NAME_RE = re.compile(r"(decoder|encoder|cross)\.(0|[1-9][0-9]{0,5})\.(key|value)", re.ASCII)
_UINT_RE = re.compile(r"[0-9]{1,9}", re.ASCII)
MAX_HEADER_BYTES = 1 << 20
# Bounds checked on the raw header before any arithmetic on it: a crafted header of 50,000 dims of
# 10**18 would otherwise hold the GIL in `math.prod` and produce numbers too long to print.
MAX_RANK = 4
MAX_DIM = 1 << 31
MAX_INT_DIGITS = 20  # JSON integers longer than this are refused while parsing (2**64 has 20 digits)
MAX_JSON_DEPTH = 32
MAX_SHOWN_CHARS = 80  # names and values quoted in error messages are cut to this


@dataclass
class ArtifactMetadata:
    task: str = ""
    model_fingerprint: str = ""
    model_type: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_header(self, artifact: PrefixArtifact) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "task": self.task,
            "model_fingerprint": self.model_fingerprint,
            "model_type": self.model_type,
            "created_at": self.created_at,
            "prefix_lengths": json.dumps(artifact.prefix_lengths),
            "dtype": DTYPE_NAMES[artifact.dtype],
            "training": json.dumps(self.training, sort_keys=True),
        }


@dataclass
class PrefixArtifact:
    """Prefix keys/values per kind: `prefixes[kind]` is `[num_layers, 2, H, L, D]`."""

    prefixes: dict[str, torch.Tensor]
    metadata: ArtifactMetadata = field(default_factory=ArtifactMetadata)

    @property
    def prefix_lengths(self) -> dict[str, int]:
        return {kind: int(t.shape[3]) for kind, t in self.prefixes.items()}

    def prefix_length(self, kind: str = "decoder") -> int:
        t = self.prefixes.get(kind)
        return 0 if t is None else int(t.shape[3])

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.prefixes.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.prefixes.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.prefixes.values())).dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PrefixArtifact:
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.prefixes.items()}
        return PrefixArtifact(prefixes=moved, metadata=self.metadata)

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.metadata.task,
            "prefix_lengths": self.prefix_lengths,
            "num_parameters": self.num_parameters,
            "dtype": DTYPE_NAMES[self.dtype],
            "model_fingerprint": self.metadata.model_fingerprint,
            "model_type": self.metadata.model_type,
            "created_at": self.metadata.created_at,
            "training": self.metadata.training,
        }


def dump_artifact(artifact: PrefixArtifact) -> bytes:
    """Serialise to safetensors bytes (per-layer `[H, L, D]` tensors + header metadata)."""
    if not artifact.prefixes:
        raise ArtifactError("an artifact needs at least one prefix kind")
    tensors: dict[str, torch.Tensor] = {}
    for kind, stacked in artifact.prefixes.items():
        if kind not in PREFIX_KINDS:
            raise ArtifactError(f"unknown prefix kind {kind!r}; expected one of {PREFIX_KINDS}")
        if stacked.dim() != 5 or stacked.shape[1] != 2:
            raise ArtifactError(f"{kind}: expected [num_layers, 2, H, L, D], got {list(stacked.shape)}")
        for i in range(stacked.shape[0]):
            tensors[f"{kind}.{i}.key"] = stacked[i, 0].detach().cpu().contiguous()
            tensors[f"{kind}.{i}.value"] = stacked[i, 1].detach().cpu().contiguous()
    return encode_safetensors(tensors, artifact.metadata.to_header(artifact))


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Deterministic safetensors bytes: sorted names and metadata, so one artifact has one sha256.

    (safetensors' own `save` emits metadata in hash-map order, which changes from call to call.)
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows space padding; 8-byte alignment helps mmap readers
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def read_header(data: bytes, limits: ArtifactLimits | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check the safetensors header without building tensors: (entries, metadata)."""
    if limits is not None and len(data) > limits.max_artifact_bytes:
        raise ArtifactError(f"artifact is {len(data)} bytes; the limit is {limits.max_artifact_bytes}")
    if len(data) < 8:
        raise ArtifactError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        _refuse_if_pickle(data)
        raise ArtifactError(
            f"not a safetensors file: header claims {header_len} bytes but the file has {len(data) - 8}"
        )
    try:
        header = parse_json(data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        _refuse_if_pickle(data)
        raise ArtifactError(f"not a safetensors file: header is not valid JSON ({shorten(exc)})") from None
    if not isinstance(header, dict):
        raise ArtifactError("not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError("header __metadata__ must map strings to strings")
    body = len(data) - 8 - header_len
    spans = []
    for name, entry in header.items():
        shown = shorten(name)
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
            raise ArtifactError(f"tensor {shown}: header entry lacks dtype/shape/data_offsets")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            plain = isinstance(dtype, str) and dtype.isascii() and dtype.isalnum() and len(dtype) <= 8
            raise ArtifactError(
                f"tensor {shown}: dtype {dtype if plain else shorten(dtype)} not supported (use F32, F16 or BF16)"
            )
        shape = entry["shape"]
        # Rank and each dim are bounded before anything multiplies them.
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK):
            raise ArtifactError(f"tensor {shown}: shape must be a list of at most {MAX_RANK} dims")
        if not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            raise ArtifactError(f"tensor {shown}: shape dims must be integers in [0, {MAX_DIM}]")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ArtifactError(f"tensor {shown}: bad data_offsets {shorten(offsets)} (want [start, end])")
        start, end = offsets
        expected = math.prod(shape) * ITEM_SIZE[dtype]  # <= (2**31)**4 * 4: cheap and printable
        if not (0 <= start <= end <= body):
            raise ArtifactError(f"tensor {shown}: data offsets [{start}, {end}) run past the end of the file")
        if end - start != expected:
            raise ArtifactError(f"tensor {shown}: {end - start} bytes for shape {shape} {dtype} ({expected})")
        spans.append((start, end))
    spans.sort()
    for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise ArtifactError("tensor data regions overlap")
    return header, metadata


def _refuse_if_pickle(data: bytes) -> None:
    """Name the usual mistake. Only called once the bytes failed as safetensors: a valid header length
    can start with 0x80 or "PK" too, so sniffing first would refuse good files."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise ArtifactError("looks like a pickle/torch checkpoint; only safetensors artifacts are accepted")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ArtifactError(f"duplicate tensor name {shorten(key)} in header")
        seen[key] = value
    return seen


def _bounded_int(text: str) -> int:
    # Python refuses ints over 4,300 digits with a plain ValueError; refuse far earlier and by name.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ArtifactError(f"JSON integer of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _no_constant(text: str) -> Any:
    raise ArtifactError(f"JSON constant {text} is not allowed")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, refusing beyond `limit` (iterative: no recursion to exhaust)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ArtifactError(f"JSON nested deeper than {limit} levels")
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str | bytes, object_pairs_hook: Any = None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for untrusted text: integers of at most 20 digits, no NaN/Infinity, bounded depth.

    Raises `ArtifactError` for what it refuses and `ValueError` (JSONDecodeError) for invalid JSON;
    a nesting deep enough to exhaust the parser's recursion is a `ValueError` too, never a 500.
    """
    try:
        value = json.loads(
            text, object_pairs_hook=object_pairs_hook, parse_int=_bounded_int, parse_constant=_no_constant
        )
    except RecursionError:
        raise ArtifactError(f"JSON nested deeper than {max_depth} levels") from None
    _depth(value, max_depth)
    return value


def shorten(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, for error messages about untrusted input."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**MAX_INT_DIGITS else "<huge int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _group_names(header: dict[str, Any]) -> dict[str, dict[int, set[str]]]:
    """kind -> layer -> {"key", "value"}; refuses names outside the format."""
    groups: dict[str, dict[int, set[str]]] = {}
    for name in header:
        m = _NAME_RE.fullmatch(name)
        if not m:
            raise ArtifactError(
                f"unexpected tensor name {shorten(name)}; expected '<decoder|encoder|cross>.<layer>.<key|value>'"
                " (ASCII, layers numbered without leading zeros)"
            )
        kind, layer, part = m.group(1), int(m.group(2)), m.group(3)
        groups.setdefault(kind, {}).setdefault(layer, set()).add(part)
    if not groups:
        raise ArtifactError("artifact holds no prefix tensors")
    return groups


def load_artifact(
    data: bytes, spec: ModelSpec | None = None, limits: ArtifactLimits | None = None
) -> PrefixArtifact:
    """Parse and validate artifact bytes; with `spec`, also check it fits that model."""
    header, meta = read_header(data, limits)
    if meta.get("format") not in (None, FORMAT_NAME):
        raise ArtifactError(f"header format is {shorten(meta.get('format'))}, expected {FORMAT_NAME!r}")
    raw_version = meta.get("format_version", str(FORMAT_VERSION))
    if not _UINT_RE.fullmatch(raw_version):  # int() would take "٣" or " 1\n"
        raise ArtifactError(f"metadata format_version {shorten(raw_version)} is not an integer")
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format_version {version} is newer than this server ({FORMAT_VERSION})")
    groups = _group_names(header)
    dtypes = {header[n]["dtype"] for n in header}
    if len(dtypes) != 1:
        raise ArtifactError(f"all tensors must share one dtype, found {sorted(dtypes)}")
    for kind, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ArtifactError(
                f"{kind}: layers must be numbered 0..{len(layers) - 1}, got {shorten(sorted(layers))}"
            )
        for layer, parts in layers.items():
            if parts != {"key", "value"}:
                raise ArtifactError(f"{kind}.{layer}: needs both key and value")
        shapes = {tuple(header[f"{kind}.{i}.{p}"]["shape"]) for i in layers for p in ("key", "value")}
        if len(shapes) != 1:
            raise ArtifactError(
                f"{kind}: all layers' keys/values must share one shape, found {shorten(sorted(shapes))}"
            )
        (shape,) = shapes
        if len(shape) != 3:
            raise ArtifactError(
                f"{kind}: tensors must be [heads, prefix_length, head_dim], got {list(shape)}"
            )
        if shape[1] < 1:
            raise ArtifactError(f"{kind}: prefix length must be at least 1")
        if limits is not None and shape[1] > limits.max_prefix_length:
            raise ArtifactError(
                f"{kind}: prefix length {shape[1]} exceeds the limit {limits.max_prefix_length}"
            )
        if spec is not None:
            _check_against_spec(kind, len(layers), shape, spec)
    fingerprint = meta.get("model_fingerprint", "")
    if spec is not None and fingerprint and fingerprint != spec.fingerprint:
        raise ArtifactError(
            f"artifact was made for model fingerprint {fingerprint}, this server runs {spec.fingerprint} "
            "(a prefix only works on the exact model it was trained for)"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # the library's own checks, as a second line of defence
        raise ArtifactError(f"safetensors could not read the file: {exc}") from None
    prefixes: dict[str, torch.Tensor] = {}
    for kind, layers in groups.items():
        per_layer = [
            torch.stack([tensors[f"{kind}.{i}.key"], tensors[f"{kind}.{i}.value"]])
            for i in range(len(layers))
        ]
        stacked = torch.stack(per_layer)  # [num_layers, 2, H, L, D]
        if not bool(torch.isfinite(stacked).all()):
            raise ArtifactError(f"{kind}: prefix holds NaN or Inf values")
        prefixes[kind] = stacked
    try:
        training = parse_json(meta.get("training", "{}") or "{}")
    except ArtifactError as exc:
        raise ArtifactError(f"metadata 'training': {exc}") from None
    except ValueError:
        raise ArtifactError("metadata 'training' is not valid JSON") from None
    metadata = ArtifactMetadata(
        task=meta.get("task", ""),
        model_fingerprint=fingerprint,
        model_type=meta.get("model_type", ""),
        created_at=meta.get("created_at", ""),
        training=training if isinstance(training, dict) else {},
        format_version=version,
    )
    return PrefixArtifact(prefixes=prefixes, metadata=metadata)


def _check_against_spec(kind: str, num_layers: int, shape: tuple[int, ...], spec: ModelSpec) -> None:
    if kind not in spec.allowed_prefix_kinds():
        raise ArtifactError(f"prefix kind {kind!r} does not apply to a {spec.kind} model ({spec.model_type})")
    want_layers, want_heads, want_dim = spec.layout(kind)
    heads, length, head_dim = shape
    if num_layers != want_layers:
        raise ArtifactError(f"{kind}: {num_layers} layers, the model has {want_layers}")
    if heads != want_heads:
        raise ArtifactError(f"{kind}: {heads} heads, the model has {want_heads}")
    if head_dim != want_dim:
        raise ArtifactError(f"{kind}: head_dim {head_dim}, the model has {want_dim}")
    # Decoder prefixes take positions: real tokens start at L, so L must leave room for at least one.
    if kind == "decoder" and length >= spec.max_positions:
        raise ArtifactError(
            f"decoder prefix length {length} leaves no room in the model's {spec.max_positions} positions"
        )


def new_artifact(
    prefixes: dict[str, torch.Tensor], spec: ModelSpec, task: str = "", training: dict[str, Any] | None = None
) -> PrefixArtifact:
    """Build an artifact for `spec` from per-kind `[num_layers, 2, H, L, D]` tensors."""
    meta = ArtifactMetadata(
        task=task, model_fingerprint=spec.fingerprint, model_type=spec.model_type, training=training or {}
    )
    artifact = PrefixArtifact(
        prefixes={k: v.detach().cpu().contiguous() for k, v in prefixes.items()}, metadata=meta
    )
    load_artifact(dump_artifact(artifact), spec)  # refuse to build what the server would refuse
    return artifact

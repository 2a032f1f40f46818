"""Import and export HF PEFT prefix-tuning adapters (`adapter_config.json` + `adapter_model.safetensors`).

PEFT saves one tensor, `prompt_embeddings`, of shape `[L, num_layers * 2 * token_dim]` (the MLP's
output when `prefix_projection` was used, so the MLP never needs to be loaded). For decoder-only models
`prompt_embeddings.view(L, 2 * num_layers, H, D).permute(1, 2, 0, 3)` is `[2 * num_layers, H, L, D]`
with layer i's key at row 2i and value at row 2i + 1 — which is our `[num_layers, 2, H, L, D]` after a
view. Seq2seq adapters (`num_transformer_submodules == 2`) cover decoder self-attention only and are
mapped by `seq2seq_decoder_prefix` (see docs/encoder-decoder.md).

Only safetensors weights are read; `adapter_model.bin` (pickle) is refused, never loaded.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as st_save

from modeling.model_spec import ModelSpec
from prefix_store.artifact import (
    ArtifactError,
    ArtifactLimits,
    ArtifactMetadata,
    PrefixArtifact,
    dump_artifact,
    load_artifact,
    parse_json,
    read_header,
    shorten,
)

PEFT_TENSOR = "prompt_embeddings"
MAX_CONFIG_INT = 1 << 20  # far above any real model's layers, heads or width; keeps products small
MAX_BASE_MODEL_CHARS = 256  # `base_model_name_or_path` is kept in the stored metadata


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if type(value) is not int or not 0 < value <= MAX_CONFIG_INT:  # `type`: true/false are not counts
        raise ArtifactError(
            f"adapter_config.json: {key} must be an integer in [1, {MAX_CONFIG_INT}], got {shorten(value)}"
        )
    return value


def parse_peft_config(config_bytes: bytes) -> dict[str, Any]:
    """Parse adapter_config.json and check it describes a prefix-tuning adapter."""
    try:
        config = parse_json(config_bytes.decode("utf-8"))
    except ArtifactError as exc:
        raise ArtifactError(f"adapter_config.json: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"adapter_config.json is not valid JSON ({shorten(exc)})") from None
    if not isinstance(config, dict):
        raise ArtifactError("adapter_config.json must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise ArtifactError(
            f"adapter_config.json has peft_type {shorten(peft_type)}; only PREFIX_TUNING is supported"
        )
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        _positive_int(config, key)
    if config["token_dim"] % config["num_attention_heads"]:
        raise ArtifactError("adapter_config.json: token_dim is not divisible by num_attention_heads")
    # Absent or null means PEFT's default (1); anything else must be the integer 1 or 2.
    if config.get("num_transformer_submodules") is None:
        config["num_transformer_submodules"] = 1
    submodules = config["num_transformer_submodules"]
    if type(submodules) is not int or submodules not in (1, 2):
        raise ArtifactError(
            f"adapter_config.json: num_transformer_submodules must be 1 or 2, got {shorten(submodules)}"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not (isinstance(base, str) and len(base) <= MAX_BASE_MODEL_CHARS):
        raise ArtifactError(
            f"adapter_config.json: base_model_name_or_path must be a string of at most "
            f"{MAX_BASE_MODEL_CHARS} characters"
        )
    return config


def _read_prompt_embeddings(model_bytes: bytes, limits: ArtifactLimits | None) -> torch.Tensor:
    header, _ = read_header(model_bytes, limits)
    names = set(header)
    if names != {PEFT_TENSOR}:
        raise ArtifactError(
            f"adapter_model.safetensors must hold exactly '{PEFT_TENSOR}', found {sorted(names)}"
        )
    from safetensors.torch import load as st_load

    tensor = st_load(model_bytes)[PEFT_TENSOR]
    if tensor.dim() != 2:
        raise ArtifactError(
            f"{PEFT_TENSOR} must be 2-D [L, num_layers*2*token_dim], got {list(tensor.shape)}"
        )
    return tensor


def peft_to_artifact(
    config_bytes: bytes,
    model_bytes: bytes,
    spec: ModelSpec,
    task: str = "",
    limits: ArtifactLimits | None = None,
) -> PrefixArtifact:
    """Convert a PEFT prefix-tuning adapter into a validated artifact for `spec`."""
    config = parse_peft_config(config_bytes)
    embeddings = _read_prompt_embeddings(model_bytes, limits)
    length, layers, token_dim, heads = (
        config["num_virtual_tokens"],
        config["num_layers"],
        config["token_dim"],
        config["num_attention_heads"],
    )
    if tuple(embeddings.shape) != (length, layers * 2 * token_dim):
        raise ArtifactError(
            f"{PEFT_TENSOR} has shape {list(embeddings.shape)}, the config implies "
            f"[{length}, {layers * 2 * token_dim}] (num_virtual_tokens, num_layers*2*token_dim)"
        )
    head_dim = token_dim // heads
    # [L, 2*layers*H*D] -> [2*layers, H, L, D]: PEFT's own view/permute (see method.md).
    natural = embeddings.view(length, 2 * layers, heads, head_dim).permute(1, 2, 0, 3).contiguous()
    submodules = config["num_transformer_submodules"]
    if spec.is_encoder_decoder or submodules == 2:
        if not spec.is_encoder_decoder:
            raise ArtifactError(
                "this PEFT adapter is for an encoder-decoder model; the server runs a decoder-only one"
            )
        if submodules != 2:
            raise ArtifactError(
                "PEFT adapter for an encoder-decoder model has num_transformer_submodules="
                f"{submodules}; only the SEQ_2_SEQ_LM layout (2) is supported"
            )
        if layers < spec.num_layers:
            raise ArtifactError(
                f"PEFT adapter has num_layers={layers}, fewer than the model's {spec.num_layers} decoder "
                "layers; PEFT itself cannot run such an adapter"
            )
        decoder = seq2seq_decoder_prefix(natural, spec.num_layers)
    else:
        decoder = natural.view(layers, 2, heads, length, head_dim)
    training = {"source": "peft", "base_model_name_or_path": config.get("base_model_name_or_path")}
    meta = ArtifactMetadata(
        task=task, model_fingerprint=spec.fingerprint, model_type=spec.model_type, training=training
    )
    artifact = PrefixArtifact(prefixes={"decoder": decoder.contiguous()}, metadata=meta)
    # Round-trip through the artifact validator so every check (layers, heads, finiteness...) applies.
    return load_artifact(dump_artifact(artifact), spec, limits)


def seq2seq_decoder_prefix(natural: torch.Tensor, num_decoder_layers: int) -> torch.Tensor:
    """PEFT seq2seq layout -> decoder self-attention prefix `[num_decoder_layers, 2, H, L, D]`.

    natural: `[2 * num_layers, H, L, D]` (PEFT's `num_layers` is the config's `num_hidden_layers`,
    which for BART is `encoder_layers`). PEFT 0.21's `get_prompt` concatenates these entries with
    themselves (`[4 * num_layers, ...]`), splits them in groups of four per decoder layer (self key,
    self value, cross key, cross value) into an `EncoderDecoderCache`, then replaces the cross-attention
    cache with an empty one, so the cross entries are never used. Decoder layer j therefore reads
    entries `4j mod 2*num_layers` (key) and `4j + 1 mod 2*num_layers` (value): with equal encoder and
    decoder depth, the upper half of the layers reuses the lower half's prefixes. Checked against PEFT
    0.21.2 forward logits (exact match) for 2/2, 3/2 and 4/4 encoder/decoder layers
    (tests/prefix_store/test_peft_seq2seq.py).
    """
    entries = natural.shape[0]
    keys = [natural[(4 * j) % entries] for j in range(num_decoder_layers)]
    values = [natural[(4 * j + 1) % entries] for j in range(num_decoder_layers)]
    return torch.stack([torch.stack([k, v]) for k, v in zip(keys, values, strict=True)])


def artifact_to_peft(
    artifact: PrefixArtifact, spec: ModelSpec, base_model_name_or_path: str = ""
) -> tuple[bytes, bytes]:
    """Export a decoder-only artifact as PEFT files: (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    if spec.is_encoder_decoder or set(artifact.prefixes) != {"decoder"}:
        raise ArtifactError(
            "PEFT export covers decoder-only prefixes; PEFT cannot express encoder/cross prefixes"
        )
    decoder = artifact.prefixes["decoder"]  # [layers, 2, H, L, D]
    layers, _, heads, length, head_dim = decoder.shape
    # [layers, 2, H, L, D] -> [2*layers, H, L, D] -> [L, 2*layers, H, D] -> [L, 2*layers*H*D]
    embeddings = decoder.reshape(2 * layers, heads, length, head_dim).permute(2, 0, 1, 3).reshape(length, -1)
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(length),
        "num_layers": int(layers),
        "token_dim": int(heads * head_dim),
        "num_attention_heads": int(heads),
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "encoder_hidden_size": int(heads * head_dim),
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    model_bytes = st_save({PEFT_TENSOR: embeddings.contiguous().cpu()})
    return json.dumps(config, indent=2).encode(), model_bytes

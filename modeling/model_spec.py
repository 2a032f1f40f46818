"""What a prefix must match: the shape of the frozen model it steers, and a fingerprint of it.

A prefix is per-layer keys/values for a *particular* model. `ModelSpec` holds the architecture facts
that decide whether an artifact fits (layers, heads, head_dim per attention kind, positions) and a
fingerprint over them plus a small digest of the weights, so that a prefix trained on another model
of the same shape (another checkpoint, another random seed) is refused rather than served as noise.

Pure: no torch here, so the store and the API can reason about models without loading one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

ModelKind = Literal["decoder-only", "encoder-decoder"]

# HF model_type values we know how to prefix, by kind.
DECODER_ONLY_TYPES = {"gpt2"}
ENCODER_DECODER_TYPES = {"bart"}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a frozen base model that a prefix artifact must agree with."""

    kind: ModelKind
    model_type: str
    num_layers: int  # decoder layers (GPT-2: n_layer; BART: decoder_layers)
    num_heads: int  # decoder attention heads
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int  # learned position embeddings: prefix + prompt + generated must fit
    num_encoder_layers: int = 0
    num_encoder_heads: int = 0
    weights_digest: str = ""
    fingerprint: str = ""

    @property
    def is_encoder_decoder(self) -> bool:
        return self.kind == "encoder-decoder"

    def layout(self, prefix_kind: str) -> tuple[int, int, int]:
        """(num_layers, num_heads, head_dim) that a prefix of `prefix_kind` must have."""
        if prefix_kind == "decoder":
            return self.num_layers, self.num_heads, self.head_dim
        if prefix_kind == "encoder":
            return self.num_encoder_layers, self.num_encoder_heads, self.head_dim
        if prefix_kind == "cross":
            return self.num_layers, self.num_heads, self.head_dim
        raise ValueError(f"unknown prefix kind {prefix_kind!r}")

    def allowed_prefix_kinds(self) -> tuple[str, ...]:
        return ("decoder", "encoder", "cross") if self.is_encoder_decoder else ("decoder",)

    @classmethod
    def from_config(cls, config: Any, weights_digest: str = "") -> ModelSpec:
        """Derive the spec from a HF `PretrainedConfig` (or anything with the same attributes)."""
        model_type = str(getattr(config, "model_type", ""))
        if model_type in DECODER_ONLY_TYPES:
            hidden = int(config.n_embd)
            heads = int(config.n_head)
            spec = cls(
                kind="decoder-only",
                model_type=model_type,
                num_layers=int(config.n_layer),
                num_heads=heads,
                head_dim=hidden // heads,
                hidden_size=hidden,
                vocab_size=int(config.vocab_size),
                max_positions=int(config.n_positions),
                weights_digest=weights_digest,
            )
        elif model_type in ENCODER_DECODER_TYPES:
            hidden = int(config.d_model)
            heads = int(config.decoder_attention_heads)
            enc_heads = int(config.encoder_attention_heads)
            if hidden // heads != hidden // enc_heads:
                raise ValueError("encoder and decoder head_dim differ; not supported")
            spec = cls(
                kind="encoder-decoder",
                model_type=model_type,
                num_layers=int(config.decoder_layers),
                num_heads=heads,
                head_dim=hidden // heads,
                hidden_size=hidden,
                vocab_size=int(config.vocab_size),
                max_positions=int(config.max_position_embeddings),
                num_encoder_layers=int(config.encoder_layers),
                num_encoder_heads=enc_heads,
                weights_digest=weights_digest,
            )
        else:
            supported = sorted(DECODER_ONLY_TYPES | ENCODER_DECODER_TYPES)
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported})")
        return spec.with_fingerprint()

    def with_fingerprint(self) -> ModelSpec:
        fields = asdict(self)
        fields.pop("fingerprint")
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        return ModelSpec(**{**fields, "fingerprint": digest})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

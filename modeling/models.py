"""Loading the frozen base model, and writing random-weight model directories.

No model weights can be downloaded on our machines, so `make_model_dir` writes a HF-format directory
with random weights for any config: tiny ones for tests, and the exact `gpt2`, `gpt2-medium`,
`bart-base`, `bart-large` shapes for benchmarks (same cost as the real checkpoints). Every directory
gets the real GPT-2 byte-level BPE tokenizer bundled in `assets/gpt2-tokenizer` (MIT, see its LICENSE);
BART directories add BART's special tokens on top of it.

`load_model` loads once, eval mode, no grad, on the configured device and dtype, and derives the
`ModelSpec` (with a dtype-independent digest of the weights) that prefix artifacts are checked against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    GPT2Config,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modeling.model_spec import ModelSpec

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "gpt2-tokenizer"
GPT2_VOCAB = 50257
BART_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}

# Presets: exact shapes of the public checkpoints, and tiny ones for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 512},
    # vLLM's CPU attention needs head_dim >= 32: the tiny model the vLLM backend's tests serve.
    "tiny-gpt2-h32": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 512},
    "gpt2": {"arch": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    "gpt2-medium": {"arch": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024},
    "gpt2-large": {"arch": "gpt2", "n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024},
    "tiny-bart": {
        "arch": "bart",
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 512,
    },
    "bart-base": {
        "arch": "bart",
        "d_model": 768,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 12,
        "decoder_attention_heads": 12,
        "encoder_ffn_dim": 3072,
        "decoder_ffn_dim": 3072,
        "max_position_embeddings": 1024,
    },
    "bart-large": {
        "arch": "bart",
        "d_model": 1024,
        "encoder_layers": 12,
        "decoder_layers": 12,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "max_position_embeddings": 1024,
    },
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_tokenizer(arch: str = "gpt2") -> PreTrainedTokenizerBase:
    """The real GPT-2 tokenizer from the bundled files; BART's special tokens added for `arch="bart"`."""
    # transformers 5 takes `vocab`/`merges` (paths); the v4 names `vocab_file`/`merges_file` are ignored.
    tok = GPT2TokenizerFast(
        vocab=str(BUNDLED_TOKENIZER_DIR / "vocab.json"), merges=str(BUNDLED_TOKENIZER_DIR / "merges.txt")
    )
    if arch == "bart":
        tok.add_special_tokens(dict(BART_SPECIAL_TOKENS))
    return tok


def build_config(preset: str, **overrides: Any) -> GPT2Config | BartConfig:
    """A HF config for a preset name (see PRESETS), with optional field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    arch = fields.pop("arch")
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=GPT2_VOCAB, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1, **fields
        )
    tok = bundled_tokenizer("bart")
    ids: dict[str, int] = {name: int(tok.convert_tokens_to_ids(t)) for name, t in BART_SPECIAL_TOKENS.items()}
    return BartConfig(
        vocab_size=50265,  # bart-base/large's vocabulary size; covers GPT-2's 50257 + 5 specials
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        decoder_start_token_id=ids["eos_token"],
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        **fields,
    )


def make_model_dir(preset: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a HF-format model directory with random weights and the bundled tokenizer.

    The same (preset, seed, overrides) always gives bit-identical weights.
    """
    out = Path(out_dir)
    config = build_config(preset, **overrides)
    torch.manual_seed(seed)
    if isinstance(config, GPT2Config):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
        tokenizer = bundled_tokenizer("gpt2")
    else:
        model = AutoModelForSeq2SeqLM.from_config(config)
        tokenizer = bundled_tokenizer("bart")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "LICENSE.tokenizer").write_text((BUNDLED_TOKENIZER_DIR / "LICENSE").read_text())
    return out


def weights_digest(model: PreTrainedModel) -> str:
    """A short digest of the input embedding that survives dtype casts (rounded to bfloat16 first)."""
    weight: torch.Tensor = model.get_input_embeddings().weight
    emb = weight.detach()[:16, :256]
    rounded = emb.to(torch.bfloat16).to(torch.float32).cpu().contiguous()
    return hashlib.sha256(rounded.numpy().tobytes()).hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LoadedModel:
    """The frozen base model, its tokenizer and spec, as loaded for serving or training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    name: str


def load_tokenizer(name_or_path: str, model_type: str) -> PreTrainedTokenizerBase:
    path = Path(name_or_path)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        tok = bundled_tokenizer(model_type)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        # GPT-2 has no pad token; padding positions are masked anyway, so EOS is a safe stand-in.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, device: str = "auto", dtype: str = "float32", trainable: bool = False
) -> LoadedModel:
    """Load a HF id (from the local hub cache) or a local HF directory, frozen, in eval mode.

    The weights digest is taken in float32 before the cast to `dtype`, so a prefix trained in
    float32 fits the same model served in bfloat16.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=torch.float32)
    digest = weights_digest(model)
    spec = ModelSpec.from_config(model.config, weights_digest=digest)
    torch_device = resolve_device(device)
    model.to(device=torch_device, dtype=DTYPES[dtype])
    model.eval()
    model.requires_grad_(trainable)
    tokenizer = load_tokenizer(name_or_path, spec.model_type)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=torch_device,
        dtype=DTYPES[dtype],
        name=name_or_path,
    )

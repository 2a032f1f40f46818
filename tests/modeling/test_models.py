"""The frozen base model: random-weight directories with real shapes, the real tokenizer, the spec."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from modeling.models import build_config, load_model, make_model_dir
from prefixserve.cli import main as cli_main


def _num_params(preset: str) -> int:
    config = build_config(preset)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):  # count without allocating: same shapes as the real checkpoint
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_gpt2_shaped_model_has_124m_parameters_and_real_tokenizer_ids(gpt2_dir):
    loaded = load_model(str(gpt2_dir), device="cpu")
    assert sum(p.numel() for p in loaded.model.parameters()) == 124_439_808
    ids = loaded.tokenizer("Hello world, the Eagle is a coffee shop.").input_ids
    assert ids == [15496, 995, 11, 262, 18456, 318, 257, 6891, 6128, 13]
    assert loaded.tokenizer.eos_token_id == 50256
    assert loaded.spec.num_layers == 12 and loaded.spec.num_heads == 12 and loaded.spec.head_dim == 64
    assert loaded.spec.max_positions == 1024


def test_presets_have_the_public_checkpoints_sizes():
    # HF model cards: gpt2-medium 355M, bart-base 139M, bart-large 406M.
    assert round(_num_params("gpt2-medium") / 1e6) == 355
    assert round(_num_params("bart-base") / 1e6) == 139
    assert round(_num_params("bart-large") / 1e6) == 406


def test_loaded_model_is_frozen_in_eval_mode(tiny_gpt2_dir):
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.device == torch.device("cpu")


def test_fingerprint_ignores_dtype_but_tells_weights_apart(tmp_path, tiny_gpt2_dir):
    fp32 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="float32").spec
    bf16 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="bfloat16").spec
    assert fp32.fingerprint == bf16.fingerprint
    other = load_model(str(make_model_dir("tiny-gpt2", tmp_path / "other", seed=1)), device="cpu").spec
    assert other.fingerprint != fp32.fingerprint
    assert (other.num_layers, other.num_heads) == (fp32.num_layers, fp32.num_heads)


def test_bart_spec_and_tokenizer_special_tokens(tiny_bart_dir):
    loaded = load_model(str(tiny_bart_dir), device="cpu")
    spec = loaded.spec
    assert spec.kind == "encoder-decoder" and spec.allowed_prefix_kinds() == ("decoder", "encoder", "cross")
    tok = loaded.tokenizer
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]) == [
        "<s>",
        "</s>",
        "<pad>",
    ]
    assert tok("Hello world").input_ids == [15496, 995]  # the same BPE as GPT-2


def test_make_model_cli_writes_a_loadable_directory(tmp_path, capsys):
    assert cli_main(["make-model", "tiny-gpt2", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "wrote tiny-gpt2" in capsys.readouterr().out
    assert load_model(str(tmp_path / "m"), device="cpu").spec.model_type == "gpt2"
    assert (tmp_path / "m" / "LICENSE.tokenizer").exists()

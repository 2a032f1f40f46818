"""Importing HF PEFT seq2seq (BART) prefix-tuning adapters: the layout matches what PEFT really runs.

Reference: PEFT 0.21 with transformers 5.19 on a tiny random BART. The references are PEFT's forward
pass, and `generate` with the prefix passed as `past_key_values` explicitly (as the PEFT baselines
pass it, loadtest/runners/peft_runners.py: with transformers 5.24, which renamed the argument to
`cache`, plain `PeftModel.generate` silently dropped the prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling import bart_prefix
from modeling.model_spec import ModelSpec
from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import ArtifactError
from prefix_store.peft_format import peft_to_artifact

peft = pytest.importorskip("peft")

SOURCE = [100, 200, 300, 400, 500, 600]
MAX_NEW = 10


def _model(tmp_path: Path, **overrides: int | float) -> LoadedModel:
    # init_std 0.2 (vs 0.02) so a random model's greedy output depends on its input and prefix.
    path = make_model_dir("tiny-bart", tmp_path / "model", init_std=0.2, **overrides)
    return load_model(str(path), device="cpu")


def _peft_adapter(loaded_path: str, tmp_path: Path, num_virtual_tokens: int, seed: int = 1):  # noqa: ANN202
    """A PEFT seq2seq prefix-tuning model with large random prefix values, and its saved files' bytes."""
    base = load_model(loaded_path, device="cpu").model  # a separate copy: PEFT wraps the model it gets
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens)
    model = peft.get_peft_model(base, config)
    weight = model.prompt_encoder["default"].embedding.weight  # [L, num_layers * 2 * d_model]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 3)
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    model.eval()
    config = json.loads((out / "adapter_config.json").read_text())
    # A fixed name, as real adapters carry a hub id: the name lands in the artifact header, and a header
    # size that depends on the tmp path would trip the header bug below at random.
    config["base_model_name_or_path"] = "tiny-bart"
    files = (json.dumps(config).encode(), (out / "adapter_model.safetensors").read_bytes())
    return model, files


def _peft_generate(model, source: list[int], max_new_tokens: int) -> list[int]:  # noqa: ANN001
    """PEFT generate with the prefix passed explicitly (see the module docstring for why)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([source]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            past_key_values=model.get_prompt(1),
        )
    return out[0, 1:].tolist()  # drop the decoder start token


def _peft_forward_greedy(model, source: list[int], max_new: int, start: int) -> list[int]:  # noqa: ANN001
    """Greedy decoding through PEFT's forward (which does apply the prefix), whole sequence each step."""
    tokens = [start]
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([tokens])).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[1:]


@pytest.mark.parametrize(("encoder_layers", "decoder_layers"), [(2, 2), (3, 2)])
def test_imported_prefix_generates_exactly_like_peft(
    tmp_path: Path, encoder_layers: int, decoder_layers: int
) -> None:
    loaded = _model(tmp_path, encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    model, (config_bytes, model_bytes) = _peft_adapter(loaded.name, tmp_path, num_virtual_tokens=3)
    artifact = peft_to_artifact(config_bytes, model_bytes, loaded.spec, task="xsum")

    assert set(artifact.prefixes) == {"decoder"}  # PEFT covers decoder self-attention only
    assert list(artifact.prefixes["decoder"].shape) == [decoder_layers, 2, 4, 3, 16]
    source = bart_prefix.wrap_source(SOURCE, loaded.model.config)
    ours = bart_prefix.greedy_generate(loaded.model, source, artifact.prefixes, MAX_NEW)
    bare = bart_prefix.greedy_generate(loaded.model, source, None, MAX_NEW)
    start = loaded.model.config.decoder_start_token_id
    assert ours != bare, "the random prefix must change the output, or this test proves nothing"
    assert ours == _peft_generate(model, source, MAX_NEW)
    assert ours == _peft_forward_greedy(model, source, MAX_NEW, start)


def test_imported_prefix_logits_match_peft_forward(tmp_path: Path) -> None:
    loaded = _model(tmp_path, encoder_layers=3, decoder_layers=2)
    model, files = _peft_adapter(loaded.name, tmp_path, num_virtual_tokens=5)
    artifact = peft_to_artifact(*files, loaded.spec)
    source = torch.tensor([bart_prefix.wrap_source(SOURCE, loaded.model.config)])  # [1, S]
    target = torch.tensor([[loaded.model.config.decoder_start_token_id, 11, 22, 33, 44]])  # [1, T]
    with torch.no_grad():
        expected = model(input_ids=source, decoder_input_ids=target).logits  # [1, T, V]
        enc = bart_prefix.encode(loaded.model, source)
        got = bart_prefix.decode(loaded.model, target, enc, None, artifact.prefixes["decoder"])
    assert (got - expected).abs().max().item() < 1e-5


def test_upper_decoder_layers_reuse_lower_layers_prefixes(tmp_path: Path) -> None:
    """PEFT's seq2seq layout: at equal depths, decoder layer j >= layers/2 reuses layer j - layers/2's prefix."""
    loaded = _model(tmp_path)  # 2 encoder, 2 decoder layers
    _, (config_bytes, model_bytes) = _peft_adapter(loaded.name, tmp_path, num_virtual_tokens=2)
    decoder = peft_to_artifact(config_bytes, model_bytes, loaded.spec).prefixes["decoder"]  # [2, 2, H, L, D]
    assert torch.equal(decoder[1], decoder[0])
    length = json.loads(config_bytes)["num_virtual_tokens"]
    from safetensors.torch import load as st_load

    raw = st_load(model_bytes)["prompt_embeddings"].view(length, 4, 4, 16).permute(1, 2, 0, 3)  # [4, H, L, D]
    assert torch.equal(decoder[0, 0], raw[0]) and torch.equal(decoder[0, 1], raw[1])


def _spec_for(tmp_path: Path, **overrides: int | float) -> ModelSpec:
    return _model(tmp_path, **overrides).spec


def test_refuses_layouts_peft_cannot_run(tmp_path: Path) -> None:
    loaded = _model(tmp_path)
    _, (config_bytes, model_bytes) = _peft_adapter(loaded.name, tmp_path, num_virtual_tokens=2)
    config = json.loads(config_bytes)
    one_submodule = json.dumps({**config, "num_transformer_submodules": 1}).encode()
    with pytest.raises(ArtifactError, match="num_transformer_submodules"):
        peft_to_artifact(one_submodule, model_bytes, loaded.spec)
    deeper_decoder = _spec_for(tmp_path / "deep", decoder_layers=3)
    with pytest.raises(ArtifactError, match="fewer than the model's 3 decoder layers"):
        peft_to_artifact(config_bytes, model_bytes, deeper_decoder)


def test_import_works_whatever_the_base_model_name(tmp_path: Path) -> None:
    """The base model name lands in the artifact header, so its length varies the header size."""
    loaded = _model(tmp_path)
    _, (config_bytes, model_bytes) = _peft_adapter(loaded.name, tmp_path, num_virtual_tokens=2)
    config = json.loads(config_bytes)
    for n in range(1, 257):
        renamed = json.dumps({**config, "base_model_name_or_path": "m" * n}).encode()
        peft_to_artifact(renamed, model_bytes, loaded.spec)

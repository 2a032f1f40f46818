"""PEFT prefix-tuning adapters convert to artifacts holding exactly what PEFT would put in the KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from modeling.models import load_model
from prefix_store.artifact import ArtifactError, dump_artifact, load_artifact
from prefix_store.peft_format import artifact_to_peft, peft_to_artifact


def _cache_layers(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer, each [B, H, L, D], from whatever cache object PEFT returns."""
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    return [(k, v) for k, v in past]


@pytest.fixture
def peft_adapter(tmp_path, tiny_gpt2_dir):
    base = load_model(str(tiny_gpt2_dir), device="cpu", trainable=True).model
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True, encoder_hidden_size=32
    )
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():  # move away from init so the test would notice a wrong layout
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    expected = [(k[0].clone(), v[0].clone()) for k, v in _cache_layers(model.get_prompt(batch_size=1))]
    return tmp_path / "adapter", expected


def test_peft_adapter_converts_to_get_prompt_tensors(peft_adapter, tiny_gpt2_dir):
    folder, expected = peft_adapter
    spec = load_model(str(tiny_gpt2_dir), device="cpu").spec
    artifact = peft_to_artifact(
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
        spec,
        task="e2e",
    )
    decoder = artifact.prefixes["decoder"]  # [layers, 2, H, L, D]
    assert decoder.shape == (2, 2, 4, 6, 16)
    for i, (key, value) in enumerate(expected):
        torch.testing.assert_close(decoder[i, 0], key, rtol=0, atol=0)
        torch.testing.assert_close(decoder[i, 1], value, rtol=0, atol=0)
    assert artifact.metadata.model_fingerprint == spec.fingerprint
    assert load_artifact(dump_artifact(artifact), spec).prefix_length() == 6


def test_export_to_peft_loads_back_in_peft_with_the_same_prompt(peft_adapter, tiny_gpt2_dir, tmp_path):
    folder, expected = peft_adapter
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    artifact = peft_to_artifact(
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
        loaded.spec,
    )
    config_bytes, model_bytes = artifact_to_peft(artifact, loaded.spec, str(tiny_gpt2_dir))
    out = tmp_path / "exported"
    out.mkdir()
    (out / "adapter_config.json").write_bytes(config_bytes)
    (out / "adapter_model.safetensors").write_bytes(model_bytes)
    peft_model = PeftModel.from_pretrained(load_model(str(tiny_gpt2_dir), device="cpu").model, out)
    for (key, value), (k2, v2) in zip(
        expected, _cache_layers(peft_model.get_prompt(batch_size=1)), strict=True
    ):
        torch.testing.assert_close(k2[0], key, rtol=0, atol=0)
        torch.testing.assert_close(v2[0], value, rtol=0, atol=0)


def test_peft_config_of_another_type_is_refused(peft_adapter, tiny_gpt2_dir):
    folder, _ = peft_adapter
    spec = load_model(str(tiny_gpt2_dir), device="cpu").spec
    config = json.loads((folder / "adapter_config.json").read_text())
    model_bytes = (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="peft_type 'LORA'"):
        peft_to_artifact(json.dumps({**config, "peft_type": "LORA"}).encode(), model_bytes, spec)
    with pytest.raises(ArtifactError, match="num_layers"):
        peft_to_artifact(json.dumps({**config, "num_layers": 3}).encode(), model_bytes, spec)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        peft_to_artifact(b"{not json", model_bytes, spec)
    with pytest.raises(ArtifactError, match="pickle"):
        peft_to_artifact(json.dumps(config).encode(), b"\x80\x04pickled", spec)

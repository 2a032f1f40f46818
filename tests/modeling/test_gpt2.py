"""modeling.gpt2, the one GPT-2 prefix forward: equal to HF PEFT's prefix-tuning forward (logits and the
prefix's gradients) to float rounding, and its cached decoding (`extend`) equal to the full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model

from modeling import gpt2
from modeling.models import LoadedModel, load_model, make_model_dir

L = 5  # prefix length
TOL = {"atol": 1e-4, "rtol": 1e-4}  # float32 rounding; the models' logits are O(1-10)


@pytest.fixture(scope="module", params=["plain", "inverse_layer_scale"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # initializer_range 0.5: outputs depend strongly on inputs and prefix, so a wrong position or mask
    # shows up far above the tolerance. The second variant checks HF's per-layer attention scale.
    extra = {"scale_attn_by_inverse_layer_idx": True} if request.param != "plain" else {}
    return make_model_dir(
        "tiny-gpt2", tmp_path_factory.mktemp("gpt2"), seed=0, initializer_range=0.5, **extra
    )


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def peft_model(model_dir: Path):  # type: ignore[no-untyped-def]
    """PEFT's prefix-tuning model on its own copy of the same weights, with a random prefix."""
    base = load_model(str(model_dir), "cpu", "float32").model
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L)
    model = get_peft_model(base, config)
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight  # [L, layers*2*E]
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def prefix_of(peft_model, spec) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """PEFT's prompt embeddings in our layout [layers, 2, H, L, D] (PEFT's own view/permute)."""
    flat = peft_model.prompt_encoder["default"].embedding.weight  # [L, layers*2*H*D]
    natural = flat.view(L, 2 * spec.num_layers, spec.num_heads, spec.head_dim).permute(1, 2, 0, 3)
    return natural.reshape(spec.num_layers, 2, spec.num_heads, L, spec.head_dim)


def right_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    lengths = [9, 4, 7]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # [B, S]
    mask = torch.zeros_like(ids)  # [B, S]
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, 1000, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def test_logits_equal_peft_on_every_real_token(ours: LoadedModel, peft_model) -> None:  # type: ignore[no-untyped-def]
    ids, mask = right_padded_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
        got = gpt2.forward(ours.model, ids, mask, prefix_of(peft_model, ours.spec))  # [B, S, V]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)
    # The prefix matters (so the comparison above is not vacuous).
    bare = gpt2.forward(ours.model, ids, mask, None)
    assert (bare[real] - expected[real]).abs().max() > 100 * TOL["atol"]


def test_without_a_prefix_it_is_the_plain_model(ours: LoadedModel) -> None:
    ids, mask = right_padded_batch()
    with torch.no_grad():
        expected = ours.model(input_ids=ids, attention_mask=mask).logits
        got = gpt2.forward(ours.model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], **TOL)


def test_the_prefix_gradient_equals_peft(ours: LoadedModel, peft_model) -> None:  # type: ignore[no-untyped-def]
    """Training through this forward moves the prefix exactly as training through PEFT would."""
    ids, mask = right_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)  # [B, S]
    weight = peft_model.prompt_encoder["default"].embedding.weight
    weight.grad = None
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected = weight.grad.clone()  # [L, layers*2*E]
    weight.grad = None

    logits = gpt2.forward(ours.model, ids, mask, prefix_of(peft_model, ours.spec))  # [B, S, V]
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # token t predicts t+1, as HF's loss
    loss = torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    torch.testing.assert_close(weight.grad, expected, **TOL)
    assert expected.abs().max() > 0
    weight.grad = None


def test_cached_decoding_with_left_padding_equals_the_full_forward(ours: LoadedModel) -> None:
    """`extend` fed its own keys/values back (the past as a masked prefix) computes the same logits as
    running each whole sequence at once, for left-padded rows with real positions from L."""
    spec = ours.spec
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(spec.num_layers, 2, spec.num_heads, L, spec.head_dim, generator=g)
    prompts = [[5, 6, 7, 8], [9, 10]]
    width = 4
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # [B, 4] left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, 4]
    positions = (L + mask.cumsum(1) - 1).clamp_min(L)  # [B, 4] the j-th real token at L + j
    with torch.no_grad():
        logits, kv = gpt2.extend(ours.model, ids, mask, prefix, position_ids=positions)
        past_mask = torch.cat([torch.ones(2, L, dtype=torch.long), mask], 1)  # [B, L+4]
        next_ids = torch.tensor([[11], [12]])  # [B, 1]
        step, _ = gpt2.extend(
            ours.model, next_ids, None, kv, prefix_mask=past_mask, position_ids=positions[:, -1:] + 1
        )
        for row, prompt in enumerate(prompts):
            full = gpt2.forward(
                ours.model, torch.tensor([[*prompt, int(next_ids[row])]]), None, prefix
            )  # [1, n+1, V]
            torch.testing.assert_close(logits[row, -1], full[0, -2], **TOL)
            torch.testing.assert_close(step[row, -1], full[0, -1], **TOL)

"""Beam search equals HF `generate` (transformers 5.19 `_beam_search`), with and without a prefix.

The reference is HF's own `model.generate(num_beams=..., early_stopping=...)` on the same random tiny
GPT-2. With a prefix, HF gets it as its cache: a `DynamicCache` holding the prefix for each of the
`num_beams` rows (HF does not expand a passed cache) and an attention mask of ones over prefix + prompt,
from which GPT-2 numbers the prompt's positions from L, the server's layout. Ours re-runs the whole
sequence each step with the prefix in a fresh cache (`training.generation.generate_causal`).

The model has a 40-token vocabulary and a boosted eos row, so hypotheses end at many different steps:
the cases cover beams that end early, beams cut at `max_new_tokens` while others have ended (the bug
this file was written for), length penalties, `min_new_tokens` and banned tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.training.conftest import hf_prefix_cache
from training.generation import generate_causal

VOCAB, EOS, LAYERS, HEADS, HEAD_DIM = 40, 0, 2, 4, 8


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=HEADS * HEAD_DIM,
        n_layer=LAYERS,
        n_head=HEADS,
        initializer_range=0.3,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        m.transformer.wte.weight[EOS] *= 3.0  # tied head: eos gets likely, so hypotheses end at varied steps
    return m


def hf_generate(
    model: GPT2LMHeadModel,
    prefix: torch.Tensor | None,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    **kwargs: object,
) -> list[int]:
    """HF's beam search; a prefix goes in as a cache pre-expanded to `num_beams` rows."""
    ids = torch.tensor([prompt])  # [1, S]
    extra: dict[str, object] = {}
    if prefix is not None:
        extra["past_key_values"] = hf_prefix_cache(prefix, num_beams)
        extra["attention_mask"] = torch.ones(1, prefix.shape[3] + len(prompt), dtype=torch.long)  # [1, L+S]
    out = model.generate(
        ids,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **extra,
        **kwargs,
    )
    generated = out[0, len(prompt) :].tolist()
    # HF pads a batch's shorter outputs after eos; a single output has nothing after its eos.
    return generated[: generated.index(EOS) + 1] if EOS in generated else generated


def cases(n: int) -> list[dict[str, object]]:
    rng = random.Random(17)
    out = []
    for i in range(n):
        out.append(
            {
                "prompt": [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))],
                "num_beams": rng.randint(2, 6),
                "max_new_tokens": rng.randint(1, 16),
                "prefix_length": rng.choice([0, 0, 1, 3, 6]),
                "length_penalty": rng.choice([1.0, 1.0, 0.8, 1.5]),
                "early_stopping": rng.random() < 0.8,
                "min_new_tokens": rng.choice([0, 0, 0, 3]),
                "banned": rng.choice([[], [], [rng.randrange(1, VOCAB)]]),
                "seed": i,
            }
        )
    return out


def test_beam_search_equals_hf_generate_on_120_random_inputs(model: GPT2LMHeadModel) -> None:
    ended, cut, differing = 0, 0, []
    for case in cases(120):
        prompt, beams, new = case["prompt"], case["num_beams"], case["max_new_tokens"]
        assert isinstance(prompt, list) and isinstance(beams, int) and isinstance(new, int)
        torch.manual_seed(int(str(case["seed"])))
        length = int(str(case["prefix_length"]))
        prefix = torch.randn(LAYERS, 2, HEADS, length, HEAD_DIM) if length else None  # [layers, 2, H, L, D]
        banned = list(case["banned"])  # type: ignore[call-overload]
        ours = generate_causal(
            model,
            prefix,
            [prompt],
            new,
            EOS,
            num_beams=beams,
            length_penalty=float(str(case["length_penalty"])),
            min_new_tokens=int(str(case["min_new_tokens"])),
            banned_ids=banned,
            early_stopping=bool(case["early_stopping"]),
        )[0]
        theirs = hf_generate(
            model,
            prefix,
            prompt,
            beams,
            new,
            length_penalty=case["length_penalty"],
            early_stopping=case["early_stopping"],
            min_new_tokens=case["min_new_tokens"],
            bad_words_ids=[[t] for t in banned] or None,
        )
        if ours != theirs:
            differing.append((case, ours, theirs))
        ended += ours[-1:] == [EOS]
        cut += len(ours) == new and ours[-1:] != [EOS]
    assert not differing, f"{len(differing)} of 120 differ; first: {differing[0]}"
    # The cases exercise both ways a search ends, not only one.
    assert ended >= 20 and cut >= 20, (ended, cut)


def test_banned_tokens_and_min_new_tokens_are_never_generated(model: GPT2LMHeadModel) -> None:
    prompt = [5, 9, 13]
    free = generate_causal(model, None, [prompt], 12, EOS, num_beams=4)[0]
    banned = sorted(set(free) - {EOS})[:2]
    assert banned, "the unconstrained output should contain some token to ban"
    for beams in (1, 4):
        out = generate_causal(
            model, None, [prompt], 12, EOS, num_beams=beams, banned_ids=banned, min_new_tokens=5
        )[0]
        assert not set(out) & set(banned)
        assert EOS not in out[:5]

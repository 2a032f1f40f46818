"""The batched sampler against HF's logits processors, on hand-made logits (no model needed).

Logits are chosen with clear gaps between tokens, so which tokens a filter keeps does not depend on
the last bit of a float on any CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from server.engine.errors import InvalidRequest
from server.engine.sampling import Sampler, filter_logits, make_row, prompt_logprobs, prompt_scores
from server.engine.types import SamplingParams

V = 12
# Two rows with distinct, well-separated values (no ties anywhere).
LOGITS = torch.tensor(
    [
        [3.1, -1.2, 0.4, 2.2, -0.3, 1.5, -2.6, 0.9, -0.8, 1.9, 0.1, -1.7],
        [-0.5, 2.8, 1.1, -1.9, 0.6, -0.1, 2.1, -2.4, 1.6, 0.2, -1.1, 0.95],
    ]
)


def _sample(logits: torch.Tensor, rows):  # type: ignore[no-untyped-def]
    return Sampler().sample(logits, rows)


def test_repetition_penalty_equals_hf_per_row() -> None:
    seen = [[0, 3, 3, 6], [1, 4]]
    penalties = [1.3, 0.7]
    rows = [
        make_row(SamplingParams(repetition_penalty=p), 0, ids) for p, ids in zip(penalties, seen, strict=True)
    ]
    from server.engine.sampling import apply_penalties

    ours = apply_penalties(LOGITS.clone(), rows)
    for r in range(2):
        hf = RepetitionPenaltyLogitsProcessor(penalties[r])(
            torch.tensor([seen[r]]), LOGITS[r : r + 1].clone()
        )
        torch.testing.assert_close(ours[r : r + 1], hf)


@pytest.mark.parametrize(
    ("ours", "hf"),
    [
        ([SamplingParams(top_k=3), SamplingParams(top_k=7)], [TopKLogitsWarper(3), TopKLogitsWarper(7)]),
        (
            [SamplingParams(top_p=0.5), SamplingParams(top_p=0.9)],
            [TopPLogitsWarper(0.5), TopPLogitsWarper(0.9)],
        ),
        (
            [SamplingParams(typical_p=0.4), SamplingParams(typical_p=0.85)],
            [TypicalLogitsWarper(0.4), TypicalLogitsWarper(0.85)],
        ),
        # Mixed in one batch: one row filtered, the other left alone.
        ([SamplingParams(top_p=0.6), SamplingParams()], [TopPLogitsWarper(0.6), None]),
        ([SamplingParams(), SamplingParams(typical_p=0.3)], [None, TypicalLogitsWarper(0.3)]),
    ],
)
def test_filters_keep_the_tokens_hf_keeps(ours, hf) -> None:  # type: ignore[no-untyped-def]
    kept = filter_logits(LOGITS.clone(), ours).isfinite()
    for r in range(2):
        expected = (
            torch.ones(V, dtype=torch.bool)
            if hf[r] is None
            else hf[r](torch.zeros(1, 1, dtype=torch.long), LOGITS[r : r + 1].clone()).isfinite()[0]
        )
        assert kept[r].tolist() == expected.tolist()
        assert 0 < int(kept[r].sum()) < V or hf[r] is None


def test_temperature_then_top_k_top_p_order_is_hf_s() -> None:
    # Temperature flattens the distribution first, so top-p then keeps more tokens.
    params = [SamplingParams(temperature=3.0, top_k=6, top_p=0.8)]
    kept = filter_logits(LOGITS[:1].clone(), params).isfinite()[0]
    scaled = LOGITS[:1] / 3.0
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, scaled)).isfinite()[0]
    assert kept.tolist() == expected.tolist()


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    # Prompt [2, 5]; generated 5, 5, 9. Presence hits 5 and 9 once; frequency 5 twice, 9 once; 2 untouched.
    row = make_row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 0, [2, 5])
    row.seen_ids += [5, 5, 9]
    from server.engine.sampling import apply_penalties

    out = apply_penalties(LOGITS[:1].clone(), [row])[0]
    expected = LOGITS[0].clone()
    expected[5] -= 0.5 + 2 * 0.25
    expected[9] -= 0.5 + 0.25
    torch.testing.assert_close(out, expected)


def test_greedy_rows_follow_logit_bias_and_penalties() -> None:
    biased = make_row(SamplingParams(logit_bias={6: 100.0}), 0, [1])
    penalised = make_row(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), 0, [0])
    penalised.seen_ids += [1, 1]  # token 1 (the best of row 1) was generated twice
    plain = make_row(SamplingParams(), 0, [1])
    out = _sample(torch.cat([LOGITS, LOGITS[:1]]), [biased, penalised, plain])
    assert out.token_ids == [6, 6, 0]  # forced; row 1's runner-up; row 0's argmax


def test_banned_token_is_never_sampled() -> None:
    params = SamplingParams(do_sample=True, logit_bias={0: -100.0, 3: -100.0})
    drawn = {_sample(LOGITS[:1] * 0.2, [make_row(params, s, [1])]).token_ids[0] for s in range(200)}
    assert 0 not in drawn and 3 not in drawn and len(drawn) > 5


def test_seeded_row_draws_the_same_tokens_alone_and_in_any_batch() -> None:
    params = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, seed=11)
    others = [
        SamplingParams(do_sample=True, seed=3, top_k=4, presence_penalty=1.0),
        SamplingParams(),
        SamplingParams(do_sample=True, seed=5, typical_p=0.5, logit_bias={2: 5.0}),
    ]
    alone = make_row(params, 11, [1, 2])
    mates = [make_row(params, 11, [1, 2])] + [make_row(p, p.seed or 0, [4]) for p in others]
    tokens_alone, tokens_batched = [], []
    for _ in range(12):
        a = _sample(LOGITS[:1] * 0.3, [alone]).token_ids[0]
        b = _sample(torch.cat([LOGITS[:1], LOGITS, LOGITS[1:]]) * 0.3, mates)
        for row, token in zip(mates, b.token_ids, strict=True):
            row.seen_ids.append(token)
        alone.seen_ids.append(a)
        tokens_alone.append(a)
        tokens_batched.append(b.token_ids[0])
    assert tokens_alone == tokens_batched
    assert len(set(tokens_alone)) > 2  # it really samples (the stream moves with the step)


def test_sampled_frequencies_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :].repeat(400, 1)  # [400, 4]: one batch of 400 rows, different seeds
    counts = torch.zeros(4)
    for round_ in range(10):
        rows = [make_row(SamplingParams(do_sample=True), round_ * 1000 + s, [0]) for s in range(400)]
        for token in _sample(logits, rows).token_ids:
            counts[token] += 1
    freq = counts / counts.sum()
    # 4000 draws: the standard error of each frequency is below 0.008; 0.035 is > 4 of them.
    assert (freq - probs).abs().max() < 0.035, freq.tolist()


def test_logprob_and_top_alternatives_are_the_model_s() -> None:
    rows = [
        make_row(SamplingParams(top_n_tokens=3, repetition_penalty=5.0), 0, [0]),
        make_row(SamplingParams(), 0, [1]),
    ]
    out = _sample(LOGITS.clone(), rows)
    logp = LOGITS.log_softmax(-1)
    # Row 0's best token (0) was penalised away, but logprobs describe the unmodified model.
    assert out.token_ids[0] == 3
    assert math.isclose(out.logprobs[0], float(logp[0, 3]), abs_tol=1e-5)
    top = logp[0].topk(3)
    assert [t for t, _ in out.top_tokens[0]] == top.indices.tolist()
    assert all(
        math.isclose(a, float(b), abs_tol=1e-5)
        for (_, a), b in zip(out.top_tokens[0], top.values, strict=True)
    )
    assert out.top_tokens[1] == []


def test_degenerate_row_falls_back_to_argmax_instead_of_failing_the_batch() -> None:
    logits = LOGITS.clone()
    logits[0] = float("nan")
    rows = [make_row(SamplingParams(do_sample=True), 1, []), make_row(SamplingParams(do_sample=True), 2, [])]
    out = _sample(logits, rows)
    assert len(out.token_ids) == 2 and all(0 <= t < V for t in out.token_ids)


def test_prompt_logprobs_score_each_token_given_the_ones_before() -> None:
    logits = LOGITS.repeat(2, 1)  # [4, V]: positions 0..3
    ids = [7, 0, 1, 3]
    got = prompt_logprobs(logits, ids)
    logp = logits.log_softmax(-1)
    assert got[0] is None
    for i in range(1, 4):
        assert math.isclose(got[i], float(logp[i - 1, ids[i]]), abs_tol=1e-5)


def test_prompt_scores_give_each_positions_top_tokens_across_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(600, V, generator=g) * 3  # [P, V]: more positions than one scoring block
    ids = torch.randint(0, V, (600,), generator=g).tolist()
    scores, top = prompt_scores(logits, ids, 3)
    logp = logits.log_softmax(-1)
    assert scores[0] is None and top is not None and top[0] == [] and len(top) == 600
    for i in (1, 255, 256, 257, 599):  # around the block boundary
        assert math.isclose(scores[i], float(logp[i - 1, ids[i]]), abs_tol=1e-5)
        values, indices = logp[i - 1].topk(3)
        assert [t for t, _ in top[i]] == indices.tolist()
        assert all(
            math.isclose(lp, float(v), abs_tol=1e-5) for (_, lp), v in zip(top[i], values, strict=True)
        )
    assert prompt_scores(logits, ids, 0) == (scores, None)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=5e-324),
        SamplingParams(repetition_penalty=1e-9),
        SamplingParams(presence_penalty=2.5),
        SamplingParams(frequency_penalty=-3.0),
        SamplingParams(typical_p=0.0),
        SamplingParams(top_n_tokens=21),
        SamplingParams(logit_bias={5: 101.0}),
    ],
)
def test_out_of_range_parameters_are_refused(params: SamplingParams) -> None:
    with pytest.raises(InvalidRequest):
        params.validate()

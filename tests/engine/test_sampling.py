"""Sampling filters and per-row generators."""

from __future__ import annotations

import torch

from server.engine.sampling import filter_logits, make_row, sample
from server.engine.types import SamplingParams


def test_top_k_top_p_and_repetition_penalty() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits.clone(), [SamplingParams(top_k=2)]).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits.clone(), [SamplingParams(top_p=0.7)]).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    kept = filter_logits(logits.clone(), [SamplingParams(top_p=0.01)]).isfinite()
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays
    # Greedy with a repetition penalty avoids the already-seen best token.
    row = make_row(SamplingParams(repetition_penalty=100.0), 0, [0], torch.device("cpu"))
    tokens, _ = sample(torch.tensor([[5.0, 4.0, 1.0, 0.0]]), [row])
    assert tokens == [1]


def test_each_row_draws_from_its_own_generator() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the draw depends only on the generator
    params = SamplingParams(do_sample=True)
    alone, _ = sample(logits.clone(), [make_row(params, 7, [], torch.device("cpu"))])
    batch = [make_row(params, s, [], torch.device("cpu")) for s in (1, 7, 3)]
    together, logprobs = sample(logits.repeat(3, 1), batch)
    assert together[1] == alone[0]
    assert len(set(together)) == 3
    assert all(abs(lp - torch.log(torch.tensor(1e-3)).item()) < 1e-5 for lp in logprobs)


def test_degenerate_distribution_falls_back_to_argmax_instead_of_raising():
    # A NaN row (e.g. from an extreme parameter that slipped past validation) must not take the batch down.
    from server.engine.sampling import make_row, sample
    from server.engine.types import SamplingParams

    logits = torch.randn(2, 50)
    logits[0] = float("nan")
    rows = [
        make_row(SamplingParams(do_sample=True, seed=1), 1, [], torch.device("cpu")),
        make_row(SamplingParams(do_sample=True, seed=2), 2, [], torch.device("cpu")),
    ]
    ids, _ = sample(logits, rows)
    assert len(ids) == 2 and 0 <= ids[1] < 50


def test_extreme_temperature_and_penalty_are_refused():
    import pytest

    from server.engine.errors import InvalidRequest
    from server.engine.types import SamplingParams

    for params in (
        SamplingParams(do_sample=True, temperature=5e-324),
        SamplingParams(repetition_penalty=1e-9),
    ):
        with pytest.raises(InvalidRequest):
            params.validate()

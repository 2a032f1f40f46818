"""Prompt logprobs with alternatives (`prompt_top_tokens`): what an evaluation harness's "is this the
greedy continuation" rests on. Checked against HF PEFT's forward pass on the same prompt, through
chunked prefill (the prompt's logits are kept chunk by chunk)."""

from __future__ import annotations

from typing import Any

import torch

from prefix_store.artifact import PrefixArtifact
from server.engine import GenerationRequest
from tests.engine.conftest import PeftReference, collect, greedy

PROMPT = "Once upon a time, in a land far away, there lived a king who had three daughters and a cat."


async def test_prompt_top_tokens_equal_peft_through_chunked_prefill(
    make_engine: Any, store: Any, peft_ref: PeftReference, artifacts: dict[int, PrefixArtifact]
) -> None:
    top_n = 4
    async with make_engine(store, max_prefill_tokens=8) as engine:  # several prefill chunks
        ids = engine.tokenize(PROMPT)
        params = greedy(1, prompt_logprobs=True, top_n_tokens=top_n)
        (event,) = await collect(engine, GenerationRequest("scored", ids, params, task="task-5"))
        (plain,) = await collect(
            engine, GenerationRequest("plain", ids, greedy(1, prompt_logprobs=True), task="task-5")
        )
    assert len(ids) > 2 * 8
    assert event.prompt_token_ids == ids
    top = event.prompt_top_tokens
    assert top is not None and len(top) == len(ids)
    assert top[0] == [] and event.prompt_logprobs is not None and event.prompt_logprobs[0] is None
    with torch.no_grad():
        model = peft_ref.model_for(artifacts[5])
        tensor = torch.tensor([ids])
        logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0].float()  # [P, V]
    logp = logits.log_softmax(-1)
    for i in range(1, len(ids)):
        alternatives = top[i]
        assert len(alternatives) == top_n
        values = [lp for _, lp in alternatives]
        assert values == sorted(values, reverse=True)  # most likely first
        want_values, want_ids = logp[i - 1].topk(top_n + 1)
        for j, (token, lp) in enumerate(alternatives):
            assert abs(lp - float(want_values[j])) < 1e-4
            assert abs(lp - float(logp[i - 1, token])) < 1e-4  # each is that token's own logprob
            if float(want_values[j] - want_values[j + 1]) > 1e-3 and (
                j == 0 or float(want_values[j - 1] - want_values[j]) > 1e-3
            ):
                assert token == int(want_ids[j])  # the rank is clear: the same token
        assert abs(event.prompt_logprobs[i] - float(logp[i - 1, ids[i]])) < 1e-4
    # Without top_n_tokens: the logprobs alone, as before.
    assert plain.prompt_logprobs == event.prompt_logprobs and plain.prompt_top_tokens is None

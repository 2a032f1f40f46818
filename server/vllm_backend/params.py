"""Our `SamplingParams` as vLLM's, and the parameters vLLM cannot serve (refused with a clear error).

Mapped one to one: max_new_tokens (max_tokens), temperature (0 for greedy), top_k, top_p,
repetition_penalty (prompt + output tokens, as ours), presence and frequency penalties (output tokens),
logit_bias, top_n_tokens (vLLM's `logprobs`: the sampled token's logprob and the N most likely, from
the raw logits, as ours), prompt_logprobs (vLLM's `prompt_logprobs` with the same N), seed (sampled
requests only: vLLM draws from a generator of the request's own), ignore_eos (EOS is a stop token id
unless it is set; with the tokenizer skipped vLLM knows no EOS of its own). Stop sequences and EOS are
also checked by our detokenizer, which decides the finish reason and the text (vLLM is told to stop).
n / best_of and truncate are the API layer's (one engine request per sequence; prompt cut before).

Structured output: the constraint, compiled by us to one EBNF grammar (`server.engine.grammar`, the
same grammar the native engine enforces), is vLLM's `StructuredOutputsParams(grammar=...)`; vLLM's
xgrammar backend (`core.py` selects it) masks the request's logits with it. vLLM sizes that bitmask
by the model's enlarged vocabulary (text + prefix rows), and the tokenizer has no entries there, so
xgrammar treats those ids as special tokens, which no grammar allows (tests/vllm_backend).

typical_p: vLLM has none; a sampled request with typical_p < 1 hands its top-k, top-p and typical-p
to our logits processor (`typical.py`, the native sampler's own filter, in the native order) instead
of vLLM's top-k/top-p.
"""

from __future__ import annotations

from typing import Any

from server.engine.types import SamplingParams


def vllm_sampling_params(
    params: SamplingParams, seed: int, eos_token_id: int | None, grammar: str | None = None
) -> Any:
    """vLLM's `SamplingParams` for one of our requests (streamed as deltas, token ids only); `grammar`:
    the request's structured-output constraint as EBNF."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from server.vllm_backend.typical import EXTRA_ARG

    sampled = params.do_sample
    typical = sampled and params.typical_p < 1.0  # our processor filters: top-k, top-p, typical-p
    extra = {EXTRA_ARG: {"top_k": params.top_k, "top_p": params.top_p, "typical_p": params.typical_p}}
    stop_ids = [] if params.ignore_eos or eos_token_id is None else [eos_token_id]
    return VllmSamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature if sampled else 0.0,
        top_k=params.top_k if sampled and not typical else 0,
        top_p=params.top_p if sampled and not typical else 1.0,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias) or None,
        # 0: the sampled token's own logprob only; None: none (a log-softmax over the vocabulary saved)
        logprobs=params.top_n_tokens if params.token_logprobs or params.top_n_tokens else None,
        prompt_logprobs=params.top_n_tokens if params.prompt_logprobs else None,
        seed=seed if sampled else None,
        ignore_eos=params.ignore_eos,
        stop_token_ids=stop_ids,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra if typical else None,
        structured_outputs=None if grammar is None else StructuredOutputsParams(grammar=grammar),
    )

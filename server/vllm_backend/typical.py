"""Typical sampling for the vLLM backend: a vLLM logits processor running our own filter.

vLLM has no `typical_p`. Requests that ask for it carry their top-k, top-p and typical-p in
`SamplingParams.extra_args` (and give vLLM top_k=0, top_p=1: `params.py`); vLLM applies temperature,
then this processor (argmax-invariant processors run after temperature, on sampled rows' logits), which
filters those rows with the native engine's `filter_logits` at temperature 1: top-k, then top-p, then
typical-p, HF's order and semantics, the same code as the native sampler. Other rows are untouched.
Loaded by vLLM in its worker process (`logits_processors` in `engine.py`).
"""

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from server.engine.sampling import filter_logits
from server.engine.types import SamplingParams

EXTRA_ARG = "prefixserve_filters"  # extra_args key: {"top_k": int, "top_p": float, "typical_p": float}


def filters_of(params: Any) -> SamplingParams | None:
    """Our filter parameters of a vLLM request (temperature 1: vLLM applied it), or None."""
    extra = params.extra_args or {}
    spec = extra.get(EXTRA_ARG)
    if not spec:
        return None
    return SamplingParams(
        do_sample=True, temperature=1.0, top_k=int(spec["top_k"]), top_p=float(spec["top_p"]),
        typical_p=float(spec["typical_p"]),
    )  # fmt: skip


class TypicalLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, SamplingParams] = {}  # batch index -> its filters

    def is_argmax_invariant(self) -> bool:
        return True  # sampled rows only (greedy rows are decided before it runs)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _prompt, _output: filters_of(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        index = sorted(i for i in self.rows if i < logits.shape[0])
        if not index:
            return logits
        rows = torch.tensor(index, device=logits.device)
        logits[rows] = filter_logits(logits[rows], [self.rows[i] for i in index])  # [n, V]
        return logits

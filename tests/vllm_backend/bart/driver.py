"""Driving our BART on vLLM directly (no engine): prefix rows, prompts, greedy runs, and the reference.

`BartVllm` writes prefixes into the core's table through the worker extension and sends prompts built
by `server.vllm_backend.bart_prompt`, as the engine will. `reference` is what a request must get:
`modeling.bart_prefix` (the functional forward the trainer trains through) run for the request alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import BartForConditionalGeneration

from modeling import bart_prefix
from modeling.models import LoadedModel
from server.vllm_backend.bart_prompt import BartPrefixRows, row_writes, table_positions, vllm_prompt
from server.vllm_backend.core import VllmCore

Prefixes = Mapping[str, Tensor]  # kind -> [layers, 2, H, L, D]
LOGPROB_TOLERANCE = 1e-3  # fp32: vLLM's kernels and ours sum in different orders


@dataclass
class Generated:
    tokens: list[int]
    logprobs: list[float]  # of each chosen token


class BartVllm:
    """The session's vLLM core serving our BART, driven as the engine will drive it."""

    def __init__(self, core: VllmCore, loaded: LoadedModel) -> None:
        self.core = core
        self.loaded = loaded
        self.config = loaded.model.config
        self._next_row = 0
        self._request_ids = itertools.count()

    async def load(self, prefixes: Prefixes | None, rows: list[int] | None = None) -> BartPrefixRows:
        """Write a prefix's kinds into `rows` (default: rows no other prefix of the session used)."""
        if not prefixes:
            return BartPrefixRows()
        lengths = {kind: int(kv.shape[-2]) for kind, kv in prefixes.items()}
        if rows is None:
            count = table_positions(lengths)
            rows = list(range(self._next_row, self._next_row + count))
            self._next_row += count
            assert self._next_row <= self.core.prefix_rows, "the test table is too small"
        for args in row_writes(prefixes, rows, self.core.dtype):
            await self.core.llm.collective_rpc("prefixserve_write_rows", args=args)
        return BartPrefixRows.of(rows, lengths)

    async def generate(
        self,
        source_ids: list[int],
        rows: BartPrefixRows,
        max_new: int,
        on_tokens: Callable[[int], None] | None = None,
    ) -> Generated:
        """Greedy, `max_new` tokens (EOS ignored), with each chosen token's logprob; `on_tokens` gets
        the count generated so far after every step."""
        from vllm import SamplingParams

        prompt = vllm_prompt(
            bart_prefix.wrap_source(source_ids, self.config),
            rows,
            self.loaded.spec.vocab_size,
            int(self.config.decoder_start_token_id),
        )
        params = SamplingParams(
            max_tokens=max_new, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False
        )
        final = None
        async for output in self.core.llm.generate(prompt, params, f"bart-{next(self._request_ids)}"):
            final = output
            if on_tokens is not None:
                on_tokens(len(output.outputs[0].token_ids))
        assert final is not None and final.finished
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        return Generated(tokens, [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)])


@torch.no_grad()
def teacher_forced_logprobs(
    model: BartForConditionalGeneration, source_ids: list[int], prefixes: Prefixes | None, tokens: list[int]
) -> Tensor:
    """Log-probabilities of the next token after the decoder start and each of `tokens` but the last:
    [len(tokens), V], through `bart_prefix` (the whole target at once)."""
    prefixes = prefixes or {}
    source = torch.tensor([bart_prefix.wrap_source(source_ids, model.config)])  # [1, S]
    encoded = bart_prefix.encode(model, source, None, prefixes.get("encoder"))  # [1, S, d]
    target = torch.tensor([[int(model.config.decoder_start_token_id), *tokens[:-1]]])  # [1, T]
    logits = bart_prefix.decode(model, target, encoded, None, prefixes.get("decoder"), prefixes.get("cross"))
    return torch.log_softmax(logits[0].float(), dim=-1)  # [T, V]


def reference(
    model: BartForConditionalGeneration, source_ids: list[int], prefixes: Prefixes | None, max_new: int
) -> Generated:
    """What the request must get: `bart_prefix`'s greedy tokens for it alone, and their logprobs."""
    source = bart_prefix.wrap_source(source_ids, model.config)
    tokens = bart_prefix.greedy_generate(model, source, prefixes, max_new, eos_token_id=None)
    table = teacher_forced_logprobs(model, source_ids, prefixes, tokens)
    return Generated(tokens, table[torch.arange(len(tokens)), torch.tensor(tokens)].tolist())


def assert_same(got: Generated, want: Generated, what: str) -> None:
    """Tokens equal; each token's logprob within `LOGPROB_TOLERANCE` of the reference's."""
    assert got.tokens == want.tokens, f"{what}: tokens differ from the reference"
    torch.testing.assert_close(
        torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=LOGPROB_TOLERANCE, rtol=0, msg=what
    )

"""Token selection for a batch whose rows have different sampling parameters.

Greedy rows take one batched argmax. Sampled rows get repetition penalty, temperature, top-k and top-p
applied as batched tensor ops (HF `generate` semantics and order), then draw with their *own*
`torch.Generator`, seeded from the request's seed: a row's draw depends only on its own logits and
its own generator, never on the other rows, so a seeded request samples the same tokens alone or in
any batch. The only host-device synchronisation is the single `.tolist()` of the chosen ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from server.engine.types import SamplingParams


def new_seed() -> int:
    """A random seed for a request that did not give one (reported back so the run can be repeated)."""
    return random.SystemRandom().randrange(2**63)


@dataclass
class RowSampling:
    """One row's sampling state: its parameters, generator and the ids seen so far (for the penalty)."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    seen_ids: list[int]  # prompt + generated ids (repetition penalty); appended by the engine


def make_row(params: SamplingParams, seed: int, prompt_ids: list[int], device: torch.device) -> RowSampling:
    generator = None
    if params.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return RowSampling(params=params, generator=generator, seen_ids=list(prompt_ids))


def apply_repetition_penalty(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """HF semantics: for every id in prompt + output, logit / p if positive else logit * p. -> [N, V]."""
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.seen_ids:
            continue
        ids = torch.tensor(row.seen_ids, device=logits.device).unique()  # [K]
        picked = logits[i, ids]  # [K]
        logits[i, ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p for every row at once. logits: [N, V] -> [N, V] (-inf = removed)."""
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)  # [N]
    logits = logits / temperature[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=dev)[None, :]  # [1, V]
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev)  # [N]
    remove = ranks >= k[:, None]  # [N, V] beyond top-k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [N, V]
    # Nucleus: drop a token when the tokens ranked above it already reach top_p; the best one always stays.
    cum_before = probs.cumsum(dim=-1) - probs  # [N, V]
    p = torch.tensor(top_p, device=dev, dtype=probs.dtype)  # [N]
    remove |= (cum_before >= p[:, None]) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # back to vocabulary order


@torch.inference_mode()
def sample(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[float]]:
    """Pick one token per row. logits: [N, V] float32. Returns (token ids, their model log-probs)."""
    logprobs = logits.log_softmax(dim=-1)  # [N, V] of the unmodified model distribution
    chosen = logits.argmax(dim=-1)  # [N] greedy choice for every row
    sampled = [i for i, row in enumerate(rows) if row.params.do_sample]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)  # [M]
        sub = apply_repetition_penalty(logits[index].clone(), [rows[i] for i in sampled])  # [M, V]
        sub = filter_logits(sub, [rows[i].params for i in sampled])
        probs = sub.softmax(dim=-1)  # [M, V]
        # Defence in depth: a row whose distribution degenerated (NaN/inf logits) falls back to its
        # argmax instead of making multinomial raise and take the whole batch down. No host sync.
        probs = torch.where(torch.isfinite(probs), probs, torch.zeros_like(probs))
        empty = probs.sum(dim=-1, keepdim=True) <= 0  # [M, 1]
        fallback = torch.nn.functional.one_hot(chosen[index], probs.shape[-1]).to(probs.dtype)  # [M, V]
        probs = torch.where(empty, fallback, probs)
        draws = [torch.multinomial(probs[j], 1, generator=rows[i].generator) for j, i in enumerate(sampled)]
        chosen[index] = torch.cat(draws)  # [M]
    greedy_penalised = [
        i for i, row in enumerate(rows) if not row.params.do_sample and row.params.repetition_penalty != 1.0
    ]
    if greedy_penalised:
        index = torch.tensor(greedy_penalised, device=logits.device)
        sub = apply_repetition_penalty(logits[index].clone(), [rows[i] for i in greedy_penalised])
        chosen[index] = sub.argmax(dim=-1)
    token_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]  # [N]
    both = torch.stack([chosen.to(logprobs.dtype), token_logprobs]).tolist()  # the one device->host read
    return [int(t) for t in both[0]], both[1]

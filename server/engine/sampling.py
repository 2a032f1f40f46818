"""Token selection for a batch whose rows each have their own sampling parameters.

`Sampler.sample(logits [B, V], rows) -> SampleOutput` is the engine's one call per step. Every row's
parameters become a column of a per-row tensor, so the device work is the same handful of batched
ops whatever the mix of greedy, sampled, penalised or biased rows; there is no Python loop over rows
on the device path, and the only device->host transfer is one `.tolist()` of the packed results.

Order (vLLM's and HF `generate`'s): logit_bias -> repetition penalty (HF: prompt + output tokens,
divide positive / multiply negative logits) -> presence and frequency penalties (OpenAI: output tokens
only, `logit -= presence * [count > 0] + frequency * count`) -> greedy rows take the argmax here;
sampled rows go on: temperature -> top-k -> top-p -> typical-p, then draw.

Seeded draws without per-row generators: a row draws token `argmax(scores + g)` where `g[v]` is Gumbel
noise (the "Gumbel-max"/exponential-race trick: equal in distribution to sampling from
`softmax(scores)`). The uniform behind `g[v]` is an integer hash of (seed, step, v) computed with
int64 tensor ops, so it is a pure function of the row's own seed and position: a seeded request
draws the same tokens alone or in any batch, on any device (integer arithmetic is exact everywhere),
and nothing has to be stored per row between steps. The hash keeps every product below 2**63, so no
signed overflow is involved.

Reported log-probabilities (chosen token and the top-n alternatives) are those of the model's own
distribution, before bias, penalties and filters (vLLM's default "raw" logprobs).

Structured output: a row with a grammar (`RowSampling.grammar`, `server.engine.grammar`) first has the
tokens its grammar does not allow next set to -inf (vLLM applies its grammar bitmask at the same
point, before everything else), and its grammar then advances by the chosen token. Constrained and
free rows share the batch: the mask touches only the constrained rows, so a free row's choice is the
same with or without constrained batch-mates. Its reported logprobs stay the model's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from server.engine.grammar import RowGrammar, allowed_tokens
from server.engine.types import SamplingParams

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (so a 32-bit value times one stays below 2**63), and a Weyl increment.
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D
_GOLDEN = 0x9E3779B1
_UNIFORM_BITS = 24  # float32 represents (k + 0.5) / 2**24 exactly
_PROMPT_BLOCK = 256  # prompt positions scored at once (a [256, V] float32 block: 51 MB for GPT-2)


def new_seed() -> int:
    """A random seed for a request that did not give one (reported back so the run can be repeated)."""
    return random.SystemRandom().randrange(2**63)


@dataclass
class RowSampling:
    """One row's sampling state: its parameters, seed and the ids seen so far (for penalties)."""

    params: SamplingParams
    seed: int
    num_prompt_tokens: int
    seen_ids: list[int] = field(default_factory=list)  # prompt + generated ids; the engine appends
    grammar: RowGrammar | None = None  # structured output: advanced by the sampler after each choice

    @property
    def step(self) -> int:
        """How many tokens this row has generated (the draw's position in its random stream)."""
        return len(self.seen_ids) - self.num_prompt_tokens

    @property
    def penalised(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def make_row(
    params: SamplingParams,
    seed: int,
    prompt_ids: list[int],
    device: object = None,
    grammar: RowGrammar | None = None,
) -> RowSampling:
    """A row's sampling state (`device` is accepted for old call sites; nothing is allocated per row)."""
    return RowSampling(
        params=params,
        seed=seed,
        num_prompt_tokens=len(prompt_ids),
        seen_ids=list(prompt_ids),
        grammar=grammar,
    )


@dataclass
class SampleOutput:
    """One step's choices, on the host. `top_tokens[r]` has the row's `top_n_tokens` best alternatives
    as (id, logprob), most likely first (empty when the row asked for none)."""

    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise that depends only on each row's (seed, step). keys: [B, 3] int64 (seed low 32 bits,
    seed high bits, step) -> [B, V] float32."""
    row = _mix(_mix(keys[:, 0] ^ _mix(keys[:, 1])) ^ ((keys[:, 2] * _GOLDEN) & _M32))  # [B]
    index = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * _GOLDEN) & _M32  # [V]
    # One finaliser per element: the per-row key is already well mixed, and the Weyl-spread index
    # differs in many bits from its neighbours, so one round decorrelates adjacent tokens.
    bits = _mix(row[:, None] ^ index[None, :])  # [B, V] in [0, 2**32)
    uniform = ((bits >> (32 - _UNIFORM_BITS)).float() + 0.5) / float(1 << _UNIFORM_BITS)  # [B, V] in (0, 1)
    return -torch.log(-torch.log(uniform))


def apply_penalties(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output only) penalties. [B, V] -> [B, V]."""
    index = [i for i, row in enumerate(rows) if row.penalised]
    if not index:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    width = max(len(rows[i].seen_ids) for i in index)
    if width == 0:
        return logits
    padded = [rows[i].seen_ids + [vocab] * (width - len(rows[i].seen_ids)) for i in index]
    ids = torch.tensor(padded, device=dev)  # [M, K]; `vocab` is a padding column dropped below
    first_output = torch.tensor([rows[i].num_prompt_tokens for i in index], device=dev)  # [M]
    is_output = torch.arange(width, device=dev)[None, :] >= first_output[:, None]  # [M, K]
    ones = torch.ones(ids.shape, device=dev, dtype=logits.dtype)  # [M, K]
    seen = torch.zeros(len(index), vocab + 1, device=dev, dtype=logits.dtype).scatter_add_(1, ids, ones)
    counts = torch.zeros_like(seen).scatter_add_(1, ids, is_output.to(logits.dtype))  # [M, V+1] outputs
    seen, counts = seen[:, :vocab] > 0, counts[:, :vocab]  # [M, V]
    params = torch.tensor(
        [
            [
                rows[i].params.repetition_penalty,
                rows[i].params.presence_penalty,
                rows[i].params.frequency_penalty,
            ]
            for i in index
        ],
        device=dev,
        dtype=logits.dtype,
    )  # [M, 3]
    rows_t = torch.tensor(index, device=dev)  # [M]
    sub = logits[rows_t]  # [M, V]
    rep = params[:, 0:1]  # [M, 1]
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    sub = sub - params[:, 1:2] * (counts > 0).to(sub.dtype) - params[:, 2:3] * counts
    logits[rows_t] = sub
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Add each row's `logit_bias` {token id: bias}. [B, V] -> [B, V]."""
    index = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not index:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    width = max(len(rows[i].params.logit_bias) for i in index)
    ids = [
        list(rows[i].params.logit_bias) + [vocab] * (width - len(rows[i].params.logit_bias)) for i in index
    ]
    values = [
        list(rows[i].params.logit_bias.values()) + [0.0] * (width - len(rows[i].params.logit_bias))
        for i in index
    ]
    bias = torch.zeros(len(index), vocab + 1, device=dev, dtype=logits.dtype)  # [M, V+1]
    bias.scatter_add_(1, torch.tensor(ids, device=dev), torch.tensor(values, device=dev, dtype=logits.dtype))
    rows_t = torch.tensor(index, device=dev)  # [M]
    logits[rows_t] = logits[rows_t] + bias[:, :vocab]
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and typical-p, each row with its own values (HF's warpers' order
    and semantics). logits: [N, V] -> [N, V], removed tokens at -inf; the best token always stays."""
    dev, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    values = torch.tensor(
        [[p.temperature, p.top_k if p.top_k > 0 else vocab, p.top_p, p.typical_p] for p in params],
        device=dev,
        dtype=torch.float64,
    )  # [N, 4]; float64 keeps top_k exact
    logits = logits / values[:, 0:1].to(dtype)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        ranks = torch.arange(vocab, device=dev)[None, :]  # [1, V]
        remove = ranks >= values[:, 1:2].long()  # [N, V] beyond top-k
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [N, V]
        # Nucleus: drop a token when the tokens ranked above it already reach top_p.
        cum_before = probs.cumsum(dim=-1) - probs  # [N, V]
        remove |= (cum_before >= values[:, 2:3].to(probs.dtype)) & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)  # back to vocabulary order
    if any(p.typical_p < 1.0 for p in params):
        logits = _typical(logits, values[:, 3].to(dtype))
    return logits


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Typical decoding (Meister et al. 2022), HF's `TypicalLogitsWarper` with a per-row mass.
    logits: [N, V], mass: [N] (1.0 = off) -> [N, V]."""
    logp = logits.log_softmax(dim=-1)  # [N, V]
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # [N, 1]
    surprise_gap = (-logp - entropy).abs()  # [N, V] distance from the expected surprise
    sorted_gap, order = surprise_gap.sort(dim=-1)  # [N, V] most typical first
    cum = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    last = (cum < mass[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)  # [N]
    remove_sorted = sorted_gap > sorted_gap.gather(1, last[:, None])  # [N, V]
    remove_sorted[:, 0] = False  # keep at least one token
    remove_sorted &= (mass < 1.0)[:, None]
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int]) -> list[float | None]:
    """Log-probability of each prompt token given the ones before it (the first has none).
    logits: [P, V], row i predicting token i + 1 -> P values."""
    return prompt_scores(logits, prompt_ids, 0)[0]


def prompt_scores(
    logits: torch.Tensor, prompt_ids: list[int], top_n: int
) -> tuple[list[float | None], list[list[tuple[int, float]]] | None]:
    """Each prompt token's log-probability given the ones before it (None for the first), and with
    `top_n` > 0 the `top_n` most likely tokens (id, logprob) at each position, best first (`[]` for
    the first: nothing precedes it), as vLLM reports prompt logprobs. Like the sampled tokens' they
    are the model's own distribution (no bias, penalties or filters).
    logits: [P, V], row i predicting token i + 1 -> P values (and P lists)."""
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids), ([[] for _ in prompt_ids] if top_n else None)
    targets = torch.tensor(prompt_ids[1:], device=logits.device)  # [P-1]
    num_top = min(top_n, logits.shape[-1])
    rows = []
    # In blocks of positions: a long prompt's log-softmax is never held whole next to its logits.
    for start in range(0, len(prompt_ids) - 1, _PROMPT_BLOCK):
        end = min(start + _PROMPT_BLOCK, len(prompt_ids) - 1)
        logp = logits[start:end].float().log_softmax(dim=-1)  # [b, V]
        packed = [logp.gather(1, targets[start:end, None]).double()]  # [b, 1]
        if num_top:
            top_values, top_ids = logp.topk(num_top, dim=-1)  # [b, n] each
            packed += [top_ids.double(), top_values.double()]
        rows.append(torch.cat(packed, dim=1))  # [b, 1 + 2n]
    host = torch.cat(rows).tolist()  # one device->host transfer; [P-1, 1 + 2n]
    scores: list[float | None] = [None, *(h[0] for h in host)]
    if not num_top:
        return scores, None
    top: list[list[tuple[int, float]]] = [[]]
    top += [[(int(h[1 + j]), h[1 + num_top + j]) for j in range(num_top)] for h in host]
    return scores, top


class Sampler:
    """Picks one token per row; see the module docstring. Stateless between steps."""

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[RowSampling]) -> SampleOutput:
        """logits: [B, V] float32 (not modified) -> the chosen ids, their logprobs, the top-n alternatives."""
        dev, vocab = logits.device, logits.shape[-1]
        clean = torch.nan_to_num(logits.float(), nan=float("-inf"))  # [B, V]
        logprobs = clean.log_softmax(dim=-1)  # [B, V] the model's own distribution
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None and r.grammar.active]
        allowed = clean  # [B, V] what each row may choose from before bias and penalties
        if constrained:
            at = torch.tensor(constrained, device=dev)  # [C]
            mask = allowed_tokens([rows[i].grammar for i in constrained], vocab, dev)  # type: ignore[misc]
            allowed = clean.clone()
            allowed[at] = allowed[at].masked_fill(~mask, float("-inf"))
        scores = apply_penalties(apply_logit_bias(allowed.clone(), rows), rows)  # [B, V]
        chosen = scores.argmax(dim=-1)  # [B] greedy choice
        sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
        if sampled:  # filters and noise only for the rows that sample (the greedy ones are done)
            index = torch.tensor(sampled, device=dev)  # [M]
            filtered = filter_logits(scores[index], [rows[i].params for i in sampled])  # [M, V]
            keys = torch.tensor(
                [[rows[i].seed & _M32, (rows[i].seed >> 32) & _M32, rows[i].step & _M32] for i in sampled],
                device=dev,
            )  # [M, 3]
            chosen[index] = (filtered + gumbel_noise(keys, vocab)).argmax(dim=-1)  # [M]
            scores[index] = filtered
        # A row whose distribution degenerated (all -inf/NaN) takes the argmax of what it may choose
        # from (the raw logits; its grammar's tokens) instead of a meaningless index; no host sync.
        usable = torch.isfinite(scores).any(dim=-1) & torch.isfinite(scores.gather(1, chosen[:, None]))[:, 0]
        chosen = torch.where(usable, chosen, allowed.argmax(dim=-1))  # [B]
        token_logprobs = logprobs.gather(1, chosen[:, None])  # [B, 1]
        num_top = min(max(r.params.top_n_tokens for r in rows), vocab)
        packed = [chosen[:, None].double(), token_logprobs.double()]
        if num_top:
            top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [B, n] each
            packed += [top_ids.double(), top_values.double()]
        host = torch.cat(packed, dim=1).tolist()  # the one device->host transfer; [B, 2 + 2n]
        top_tokens = [
            [(int(h[2 + j]), h[2 + num_top + j]) for j in range(r.params.top_n_tokens)] if num_top else []
            for h, r in zip(host, rows, strict=True)
        ]
        token_ids = [int(h[0]) for h in host]
        for i in constrained:
            rows[i].grammar.accept(token_ids[i])  # type: ignore[union-attr]
        return SampleOutput(token_ids, [h[1] for h in host], top_tokens)


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[float]]:
    """Compatibility wrapper: (token ids, logprobs) of `Sampler().sample`."""
    out = Sampler().sample(logits, rows)
    return out.token_ids, out.logprobs

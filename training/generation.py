"""Generation from an exported prefix (the artifact's tensors), as the server computes it.

GPT-2 (`generate_causal`): `modeling.gpt2`, the one GPT-2 prefix forward (the trainer's too), with
the keys/values of each call fed back as the next call's past (`gpt2.extend`). Rows of a batch are
left-padded here, so the past is `[prefix (L) | padding | prompt | generated]` with padding masked.
That is this module's batching, not the server's layout (the engine keeps each task's prefix once and
a row's own `[prompt | generated]` tokens in a paged pool, see `server/engine/paged_kv.py`); both compute
the same function because in both a row's j-th real token has position `L + j` and padding is never
attended.

BART (`generate_seq2seq`): `modeling.bart_prefix` with the artifact's encoder/decoder/cross
prefixes.

Greedy decoding is batched and cached. Beam search (`num_beams > 1`) runs one source at a time over
its beams, re-running the full sequence each step (simple, and fast enough for evaluation), and makes
HF `generate`'s choices step for step (`beam_search`; tested against HF in
tests/training/test_beam_search.py). Both can ban tokens and forbid eos before `min_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from modeling import bart_prefix, gpt2


@torch.no_grad()
def causal_logits(model: torch.nn.Module, prefix: Tensor | None, seqs: Sequence[Sequence[int]]) -> Tensor:
    """Next-token logits `[N, V]` after each full sequence (left-padded, no reuse of a cache)."""
    logits, _ = _causal_prefill(model, prefix, seqs)
    return logits


def _causal_prefill(
    model: torch.nn.Module, prefix: Tensor | None, seqs: Sequence[Sequence[int]]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(last logits [B, V], (past keys/values [layers, 2, B, H, L+S, D], its mask [B, L+S], last positions [B]))."""
    device = model.get_input_embeddings().weight.device
    batch, width = len(seqs), max(len(s) for s in seqs)
    prefix_len = 0 if prefix is None else prefix.shape[3]
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, S], left-padded
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, S]
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, device=device)
        mask[row, width - len(seq) :] = 1
    positions = (prefix_len + mask.cumsum(1) - 1).clamp_min(prefix_len)  # [B, S]: j-th real token at L + j
    full_mask = torch.cat(
        [torch.ones(batch, prefix_len, dtype=torch.long, device=device), mask], 1
    )  # [B, L+S]
    past = None if prefix is None else prefix.to(device)  # [layers, 2, H, L, D]
    logits, kv = gpt2.extend(model, ids, mask, past, position_ids=positions)  # [B, S, V], [.., B, H, L+S, D]
    return logits[:, -1].float(), (kv, full_mask, positions[:, -1])  # [B, V]


@torch.no_grad()
def greedy_causal(
    model: torch.nn.Module,
    prefix: Tensor | None,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    min_new_tokens: int = 0,
    banned_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Batched cached greedy decoding; each output stops after eos (kept) or `max_new_tokens`. Banned
    ids, and eos before `min_new_tokens`, are never chosen (as in `beam_search`)."""
    logits, (past, mask, last_pos) = _causal_prefill(model, prefix, prompts)
    batch = len(prompts)
    device = logits.device
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_ids = suppress_tokens(logits, step, eos_id, min_new_tokens, banned_ids).argmax(-1)  # [B]
        finished = done.tolist()
        for row, token in enumerate(next_ids.tolist()):  # the one host read per step
            if not finished[row]:
                outputs[row].append(token)
        if eos_id is not None:
            done |= next_ids == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1  # [B]
        step_logits, past = gpt2.extend(
            model, next_ids[:, None], None, past, position_ids=last_pos[:, None], prefix_mask=mask
        )  # [B, 1, V], [layers, 2, B, H, L+S+t+1, D]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], 1)  # [B, L+S+t+1]
        logits = step_logits[:, -1].float()  # [B, V]
    return outputs


def suppress_tokens(
    logits: Tensor, num_generated: int, eos_id: int | None, min_new_tokens: int, banned_ids: Sequence[int]
) -> Tensor:
    """`logits` `[N, V]` with banned ids, and eos before `min_new_tokens` generated tokens, set to -inf
    (HF's `NoBadWordsLogitsProcessor` for one-token words and `MinNewTokensLengthLogitsProcessor`)."""
    blocked = list(banned_ids)
    if eos_id is not None and num_generated < min_new_tokens:
        blocked.append(eos_id)
    if not blocked:
        return logits
    logits = logits.clone()
    logits[:, blocked] = float("-inf")
    return logits


@dataclass(frozen=True)
class BeamSettings:
    """What a beam search needs besides the model: HF `generate`'s knobs of the same names."""

    num_beams: int
    max_new_tokens: int
    eos_id: int | None
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    banned_ids: tuple[int, ...] = ()
    early_stopping: bool = True


def beam_search(step_logits: Callable[[list[list[int]]], Tensor], settings: BeamSettings) -> list[int]:
    """Beam search for one source, step for step HF `generate(num_beams=..., early_stopping=...)`.

    `step_logits(generated_so_far)` gives `[N, V]` next-token logits for N partial outputs (the caller
    closes over the source). Returns the best hypothesis' ids (ending in eos unless cut at
    `max_new_tokens`). HF's rules, kept exactly (transformers 5.19 `_beam_search`):
    - each step ranks `2 * num_beams` (beam, token) candidates by summed log-probability (log-softmax,
      then -inf for suppressed tokens); the best `num_beams` that do not end carry on;
    - a candidate that ends (eos, or any candidate at the last step) becomes a hypothesis only if it
      ranks among the first `num_beams`, scored sum / (generated length incl. eos) ** length_penalty;
      the best `num_beams` hypotheses are kept;
    - the search stops once `num_beams` hypotheses exist and either `early_stopping` or no live beam
      can still beat the worst of them (HF's heuristic: best live sum / current length ** penalty).
    """
    num_beams, max_new_tokens, eos_id = settings.num_beams, settings.max_new_tokens, settings.eos_id
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []  # (normalised score, ids), best first, <= num_beams
    for step in range(max_new_tokens):
        logits = step_logits([b for b, _ in beams]).float()  # [N, V]
        logprobs = suppress_tokens(
            torch.log_softmax(logits, dim=-1), step, eos_id, settings.min_new_tokens, settings.banned_ids
        )
        scores = logprobs + torch.tensor([s for _, s in beams], device=logprobs.device)[:, None]  # [N, V]
        top = scores.view(-1).topk(min(2 * num_beams, scores.numel()))
        vocab, last, length = logprobs.shape[-1], step == max_new_tokens - 1, step + 1
        live: list[tuple[list[int], float]] = []
        for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            seq = [*beams[flat // vocab][0], flat % vocab]
            if last or (eos_id is not None and seq[-1] == eos_id):
                if rank < num_beams:  # HF drops enders ranked below the first num_beams
                    finished.append((score / length**length_penalty, seq))
            elif len(live) < num_beams:
                live.append((seq, score))
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:num_beams]
        beams = live
        if last or not beams:
            break
        if len(finished) == num_beams and (
            early_stopping or beams[0][1] / length**length_penalty <= finished[-1][0]
        ):
            break
    return finished[0][1] if finished else []


def generate_causal(
    model: torch.nn.Module,
    prefix: Tensor | None,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 16,
    min_new_tokens: int = 0,
    banned_ids: Sequence[int] = (),
    early_stopping: bool = True,
) -> list[list[int]]:
    """GPT-2 generation for many prompts with a `[layers, 2, H, L, D]` prefix (or None)."""
    if num_beams <= 1:
        out: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out.extend(
                greedy_causal(model, prefix, chunk, max_new_tokens, eos_id, min_new_tokens, banned_ids)
            )
        return out
    settings = BeamSettings(
        num_beams, max_new_tokens, eos_id, length_penalty, min_new_tokens, tuple(banned_ids), early_stopping
    )
    results = []
    for prompt in prompts:

        def step(gens: list[list[int]], prompt: Sequence[int] = prompt) -> Tensor:
            return causal_logits(model, prefix, [[*prompt, *g] for g in gens])

        results.append(beam_search(step, settings))
    return results


@torch.no_grad()
def generate_seq2seq(
    model: torch.nn.Module,
    prefixes: dict[str, Tensor],
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_new_tokens: int = 0,
    banned_ids: Sequence[int] = (),
    early_stopping: bool = True,
) -> list[list[int]]:
    """BART generation, one source at a time; `sources` are encoder inputs (already bos/eos-wrapped).
    Greedy with suppressed tokens runs as a one-beam search (the same choices as greedy)."""
    device = model.get_input_embeddings().weight.device
    prefixes = {k: v.to(device=device, dtype=model.dtype) for k, v in prefixes.items()}
    start = int(model.config.decoder_start_token_id)
    settings = BeamSettings(
        num_beams, max_new_tokens, eos_id, length_penalty, min_new_tokens, tuple(banned_ids), early_stopping
    )
    results = []
    for src in sources:
        if num_beams <= 1 and min_new_tokens == 0 and not banned_ids:
            results.append(bart_prefix.greedy_generate(model, list(src), prefixes, max_new_tokens, eos_id))
            continue
        src_ids = torch.tensor([list(src)], device=device)  # [1, S]
        enc = bart_prefix.encode(model, src_ids, None, prefixes.get("encoder"))  # [1, S, d]

        def step(gens: list[list[int]], enc: Tensor = enc) -> Tensor:
            tgt = torch.tensor([[start, *g] for g in gens], device=device)  # [N, T] (beams share a length)
            hidden = enc.expand(len(gens), -1, -1)  # [N, S, d]
            logits = bart_prefix.decode(
                model, tgt, hidden, None, prefixes.get("decoder"), prefixes.get("cross")
            )
            return logits[:, -1].float()  # [N, V]

        results.append(beam_search(step, settings))
    return results

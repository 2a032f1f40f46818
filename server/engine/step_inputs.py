"""The per-step inputs of the GPT-2 runner: built on the host, sent to the device in one copy.

Packed token order of a step: the decoding rows' tokens (one each, rows grouped by prefix), then the
prefill chunks' tokens (chunk after chunk). Every integer the forward needs is appended to one host
list, turned into one int64 tensor (pinned when the device is CUDA) and copied with
`non_blocking=True`; the device-side views are slices of that one tensor. Masks are derived on the
device from lengths, so no mask crosses the bus.

Own-token gathers are padded per part to the longest row of that part; padding points at the row's
first own slot (always written before attention runs, so never uninitialised memory) and is masked.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.paged_kv import PagedKVCache
from server.engine.runner import PrefillItem

if TYPE_CHECKING:
    from server.engine.gpt2_runner import GPT2Runner

Group = tuple[int, int, torch.Tensor]  # rows [start, end) of a part that read prefix kv [layers, 2, H, L, D]


@dataclass
class StepInputs:
    sample_ids: list[str]  # request ids of the logits rows, in order
    num_decode: int
    num_prefill: int
    max_chunk: int
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position id = prefix length + own index
    write_slots: torch.Tensor  # [T] pool slot of each token's K/V
    decode_gather: torch.Tensor  # [N, S_d] pool slots of each decoding row's own tokens
    decode_mask: torch.Tensor  # [N, 1, 1, S_d]
    prefill_gather: torch.Tensor  # [n, S_p]
    prefill_mask: torch.Tensor  # [n, 1, Q, S_p]
    prefill_flat: torch.Tensor  # [T_p] index of each prefill token in the [n, Q] query grid
    sample_index: torch.Tensor  # [n_sample] packed index of each token whose logits are needed
    decode_groups: list[Group]
    prefill_groups: list[Group]
    prompt_spans: list[tuple[str, int, int]]  # packed token range of each chunk whose prompt logits are kept

    @classmethod
    def build(cls, runner: GPT2Runner, decode_tokens: dict[str, int], items: list[PrefillItem]) -> StepInputs:
        cache = runner.cache
        rows = cache.rows
        decode_ids = runner._grouped(list(decode_tokens))
        by_id = {it.request_id: it for it in items}
        prefill_ids = runner._grouped(list(by_id))
        tokens: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        for rid in decode_ids:
            row = rows[rid]
            if not row.prefilled:
                raise ValueError(f"request {rid!r} is still prefilling; it cannot decode")
            positions.append(row.prefix_length + row.length)
            tokens.append(decode_tokens[rid])
            writes += cache.append_slots(rid, 1)
        dec_lens = [rows[r].length for r in decode_ids]
        s_dec = max(dec_lens, default=0)
        dec_gather = [s for r in decode_ids for s in _padded(cache.slots(r, rows[r].length), s_dec)]

        starts: list[int] = []
        flat: list[int] = []
        sample_index = list(range(len(decode_ids)))
        sample_ids = list(decode_ids)
        prompt_spans: list[tuple[str, int, int]] = []
        q_max = max((_end(by_id[r]) - by_id[r].start for r in prefill_ids), default=0)
        for i, rid in enumerate(prefill_ids):
            it, row = by_id[rid], rows[rid]
            end = _end(it)
            if it.start != row.length or not it.start < end <= len(it.input_ids):
                raise ValueError(
                    f"request {rid!r}: chunk [{it.start}, {end}) does not follow its {row.length} tokens"
                )
            if it.prompt_logprobs:
                prompt_spans.append((rid, len(tokens), len(tokens) + end - it.start))
            positions += range(row.prefix_length + it.start, row.prefix_length + end)
            tokens += it.input_ids[it.start : end]
            writes += cache.append_slots(rid, end - it.start)
            starts.append(it.start)
            flat += range(i * q_max, i * q_max + end - it.start)
            if end == len(it.input_ids):
                sample_index.append(len(tokens) - 1)
                sample_ids.append(rid)
        s_pre = max((_end(by_id[r]) for r in prefill_ids), default=0)
        pre_gather = [s for r in prefill_ids for s in _padded(cache.slots(r, _end(by_id[r])), s_pre)]

        parts = [tokens, positions, writes, dec_gather, dec_lens, pre_gather, starts, flat, sample_index]
        device_parts = _to_device(parts, runner.device)
        t_ids, pos, slots, d_gather, d_lens, p_gather, p_starts, p_flat, s_index = device_parts
        ar = runner._arange
        n_dec, n_pre = len(decode_ids), len(prefill_ids)
        decode_mask = (ar[:s_dec][None, :] < d_lens[:, None])[:, None, None, :]  # [N, 1, 1, S_d]
        last_seen = p_starts[:, None] + ar[:q_max][None, :]  # [n, Q] query i sees own indices <= start + i
        prefill_mask = (ar[:s_pre][None, None, :] <= last_seen[:, :, None])[:, None]  # [n, 1, Q, S_p]
        return cls(
            sample_ids=sample_ids,
            num_decode=n_dec,
            num_prefill=n_pre,
            max_chunk=q_max,
            token_ids=t_ids,
            positions=pos,
            write_slots=slots,
            decode_gather=d_gather.view(n_dec, s_dec),
            decode_mask=decode_mask,
            prefill_gather=p_gather.view(n_pre, s_pre),
            prefill_mask=prefill_mask,
            prefill_flat=p_flat,
            sample_index=s_index,
            decode_groups=_groups(cache, decode_ids),
            prefill_groups=_groups(cache, prefill_ids),
            prompt_spans=prompt_spans,
        )


def _end(item: PrefillItem) -> int:
    return len(item.input_ids) if item.end is None else item.end


def _padded(slots: list[int], width: int) -> list[int]:
    return slots + [slots[0]] * (width - len(slots))


def _groups(cache: PagedKVCache, request_ids: list[str]) -> list[Group]:
    """Contiguous runs of rows that read one prefix (rows are already grouped)."""
    rows, prefixes = cache.rows, cache.prefixes
    groups: list[Group] = []
    start = 0
    for i in range(1, len(request_ids) + 1):
        key: Hashable | None = rows[request_ids[start]].prefix_key
        if i == len(request_ids) or rows[request_ids[i]].prefix_key != key:
            if key is not None:
                groups.append((start, i, prefixes.get(key)))
            start = i
    return groups


def _to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """One host tensor for all parts (pinned on CUDA), one non-blocking copy, split into views."""
    sizes = [len(p) for p in parts]
    host = torch.tensor([v for p in parts for v in p], dtype=torch.long)  # [sum(sizes)]
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).split(sizes))

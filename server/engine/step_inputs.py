"""The per-step inputs of the GPT-2 runner: built on the host, sent to the device in one copy.

Packed token order of a step: the decoding rows' tokens (one each, rows grouped by prefix), then the
prefill chunks' tokens (chunk after chunk). Every integer the forward needs is appended to one host
list, turned into one int64 tensor (pinned when the device is CUDA) and copied with
`non_blocking=True`; the device-side views are slices of that one tensor. Masks are derived on the
device from lengths, so no mask crosses the bus.

Each attention call (the decoding rows; the prefill chunks) runs over *slots* laid out by
`prefix_layout.py`: the rows themselves, or a [groups, n] grid whose padding slots repeat row 0. A
slot's query i (of Q) sees its own tokens [0, first + i], where `first` is the own index of its first
query (decode: length - 1), and its prefix columns [lo, hi). Own-token gathers are padded to the
longest row; padding points at the row's first own slot (always written before attention runs, so
never uninitialised memory) and is masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.attention import cascade_attention
from server.engine.paged_kv import PagedKVCache
from server.engine.prefix_layout import attention_bias, plan_layout
from server.engine.runner import PrefillItem

if TYPE_CHECKING:
    from server.engine.gpt2_parts import GPT2Parts


@dataclass
class AttentionCall:
    """One attention call's device inputs (the decoding rows, or the prefill chunks), in slot order."""

    num_slots: int
    own_width: int  # S: own keys gathered per slot
    gather: torch.Tensor  # [H * slots * S] row of each (head, slot, own key) in a layer's pool viewed
    # [H * pool slots, D] (`PagedKVCache.head_offsets`)
    bias: torch.Tensor  # [slots, Q, Lk + S] additive: 0 may attend, -inf not; prefix columns first
    prefix_keys: list[torch.Tensor] | None  # per layer [H, G, Lk, D]; None: no row has a prefix
    prefix_values: list[torch.Tensor] | None


@dataclass
class StepInputs:
    sample_ids: list[str]  # request ids of the logits rows, in order
    num_decode: int
    num_prefill: int
    max_chunk: int
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position id = prefix length + own index
    write_slots: torch.Tensor  # [T] pool slot of each token's K/V
    decode: AttentionCall | None
    decode_slot_rows: torch.Tensor | None  # [slots] decoding row in each slot; None: slots are the rows
    decode_row_slots: torch.Tensor | None  # [N] slot of each decoding row
    prefill: AttentionCall | None
    prefill_flat: torch.Tensor  # [T_p] index of each prefill token in the [slots, Q] query grid
    sample_index: torch.Tensor  # [n_sample] packed index of each token whose logits are needed
    prompt_spans: list[tuple[str, int, int]]  # packed token range of each chunk whose prompt logits are kept

    @classmethod
    def build(cls, runner: GPT2Parts, decode_tokens: dict[str, int], items: list[PrefillItem]) -> StepInputs:
        cache = runner.cache
        rows = cache.rows
        decode_ids = runner.grouped(list(decode_tokens))
        by_id = {it.request_id: it for it in items}
        prefill_ids = runner.grouped(list(by_id))
        for rid in decode_ids:
            if not rows[rid].prefilled:
                raise ValueError(f"request {rid!r} is still prefilling; it cannot decode")
        tokens = [decode_tokens[r] for r in decode_ids]
        positions = [rows[r].prefix_length + rows[r].length for r in decode_ids]
        writes = [s for r in decode_ids for s in cache.append_slots(r, 1)]
        dec_lengths = [rows[r].length for r in decode_ids]
        dec = CallPlan(cache, runner.prefix_layout, decode_ids, [n - 1 for n in dec_lengths], dec_lengths, 1)

        sample_index = list(range(len(decode_ids)))
        sample_ids = list(decode_ids)
        prompt_spans: list[tuple[str, int, int]] = []
        ends = [_end(by_id[r]) for r in prefill_ids]
        starts = [by_id[r].start for r in prefill_ids]
        q_max = max((e - s for s, e in zip(starts, ends, strict=True)), default=0)
        pre = CallPlan(cache, runner.prefix_layout, prefill_ids, starts, ends, q_max)
        flat: list[int] = []
        for i, (rid, end) in enumerate(zip(prefill_ids, ends, strict=True)):
            it, row = by_id[rid], rows[rid]
            if it.start != row.length or not it.start < end <= len(it.input_ids):
                raise ValueError(
                    f"request {rid!r}: chunk [{it.start}, {end}) does not follow its {row.length} tokens"
                )
            if it.prompt_logprobs:
                prompt_spans.append((rid, len(tokens), len(tokens) + end - it.start))
            positions += range(row.prefix_length + it.start, row.prefix_length + end)
            tokens += it.input_ids[it.start : end]
            writes += cache.append_slots(rid, end - it.start)
            first = pre.row_slots[i] * q_max
            flat += range(first, first + end - it.start)
            if end == len(it.input_ids):
                sample_index.append(len(tokens) - 1)
                sample_ids.append(rid)

        parts = [tokens, positions, writes, flat, sample_index, *dec.host_parts(), *pre.host_parts()]
        device_parts = to_device(parts, runner.device)
        t_ids, pos, slots, p_flat, s_index = device_parts[:5]
        d_parts, p_parts = device_parts[5:11], device_parts[11:17]
        return cls(
            sample_ids=sample_ids,
            num_decode=len(decode_ids),
            num_prefill=len(prefill_ids),
            max_chunk=q_max,
            token_ids=t_ids,
            positions=pos,
            write_slots=slots,
            decode=dec.call(cache, runner.attention_dtype, d_parts) if decode_ids else None,
            decode_slot_rows=None if dec.identity else d_parts[4],
            decode_row_slots=None if dec.identity else d_parts[5],
            prefill=pre.call(cache, runner.attention_dtype, p_parts) if prefill_ids else None,
            prefill_flat=p_flat,
            sample_index=s_index,
            prompt_spans=prompt_spans,
        )


class CallPlan:
    """Host side of one attention call over `cache`'s rows: its prefix layout and integer inputs in slot order.

    Shared by the GPT-2 runner (decode and prefill calls) and the BART runner (decoder self-attention
    and cross-attention, each over its own pool). `layout_choice`: `plan_layout`'s choice.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        layout_choice: str,
        request_ids: list[str],
        firsts: list[int],
        own_lengths: list[int],
        num_queries: int,
    ) -> None:
        """`firsts`: own index of each row's first query; `own_lengths`: its own tokens after the step."""
        rows = cache.rows
        self.rows = [rows[r] for r in request_ids]
        self.num_queries = num_queries
        self.own_width = max(own_lengths, default=0)  # S
        lengths = {row.prefix_key: row.prefix_length for row in self.rows}
        keys = [row.prefix_key for row in self.rows]
        self.layout = plan_layout(keys, lengths, self.own_width, layout_choice)
        identity = list(range(len(request_ids)))
        self.slot_rows = identity if self.layout is None else self.layout.slot_rows
        self.row_slots = identity if self.layout is None else self.layout.row_slots
        self.identity = self.layout is None or self.layout.identity
        self.firsts = [firsts[r] for r in self.slot_rows]

    def host_parts(self) -> list[list[int]]:
        """gather, firsts, lo, hi, slot rows, row slots (call after the step's slots are appended)."""
        width, gather = self.own_width, []
        for r in self.slot_rows:
            row = self.rows[r]
            own = row.slot_ids[: min(row.length, width)]
            gather += own
            gather += [own[0]] * (width - len(own))
        num_slots = len(self.slot_rows)
        lo = [0] * num_slots if self.layout is None else self.layout.lo
        hi = [0] * num_slots if self.layout is None else self.layout.hi
        return [gather, self.firsts, lo, hi, self.slot_rows, self.row_slots]

    def call(self, cache: PagedKVCache, adt: torch.dtype, parts: list[torch.Tensor]) -> AttentionCall:
        """The device side from `parts` (the device copies of `host_parts`); `adt`: the attention dtype."""
        gather, firsts, lo, hi = parts[:4]
        layout = self.layout
        width = 0 if layout is None else layout.width
        bias = attention_bias(firsts, lo, hi, self.num_queries, self.own_width, width, adt)
        keys, values = (None, None) if layout is None else cache.prefixes.stacked(layout, adt)
        by_head = (cache.head_offsets[:, None] + gather[None, :]).reshape(-1)  # [H * slots * S]
        return AttentionCall(len(self.slot_rows), self.own_width, by_head, bias, keys, values)


def _end(item: PrefillItem) -> int:
    return len(item.input_ids) if item.end is None else item.end


def to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """One host tensor for all parts (pinned on CUDA), one non-blocking copy, split into views."""
    sizes = [len(p) for p in parts]
    host = torch.tensor([v for p in parts for v in p], dtype=torch.long)  # [sum(sizes)]
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).split(sizes))


def gather_own(
    cache: PagedKVCache, layer: int, call: AttentionCall, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's own keys and values of `call`'s slots, gathered from `cache`'s pool: [H, slots, S, D]
    each, in `dtype` (a copy)."""
    H, D = cache.num_heads, cache.head_dim
    keys = cache.keys[layer].view(-1, D).index_select(0, call.gather)  # [H*slots*S, D]
    values = cache.values[layer].view(-1, D).index_select(0, call.gather)
    if keys.dtype != dtype:
        keys, values = keys.to(dtype), values.to(dtype)
    shape = (H, call.num_slots, call.own_width, D)
    return keys.view(shape), values.view(shape)


def paged_attention(
    cache: PagedKVCache,
    layer: int,
    q: torch.Tensor,
    call: AttentionCall,
    scale: float,
    own: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One layer's attention of `call`'s slots over [prefix | own tokens in `cache`'s pool].

    q: [H, slots, Q, D] in the attention dtype; `own`: the slots' own keys/values already gathered
    (`gather_own`), else gathered here. -> [H, slots, Q, D].
    """
    own_k, own_v = own if own is not None else gather_own(cache, layer, call, q.dtype)
    pk = None if call.prefix_keys is None else call.prefix_keys[layer]  # [H, G, Lk, D]
    pv = None if call.prefix_values is None else call.prefix_values[layer]
    return cascade_attention(q, own_k, own_v, call.bias, pk, pv, scale)

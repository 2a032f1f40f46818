"""The static decode step: a decode-only step with shapes fixed by buckets, so a CUDA graph can replay it.

The eager step (`GPT2Runner._forward`) has data-dependent shapes: the own-token gather is as wide as the
longest row, and prefix attention loops over a Python list of prefix groups. Here every shape is a
function of a bucket key `(B, W, A)` and every per-step value lives in one integer tensor:

    B  rows, the decode batch padded to a bucket (1, 2, 4, 8, 16, 24, 32, 48, ...; `geometric_buckets`)
    W  own-token gather width, the longest row's length (this step's token included) padded to a bucket
       of block multiples
    A  prefix-arena width (`PrefixArena.width` padded to a bucket; 0 when no row has a prefix)

    ints: [7 * B + B * W] int64 = token_ids [B] | positions [B] | write_slots [B] | write_src [B]
                                 | lengths [B] | prefix_lo [B] | prefix_hi [B] | gather [B, W]

Padding rows (index >= N real rows) are copies of row 0: same token, position, gather and prefix span.
They compute row 0's values again, so they need no scratch slot, no special mask and cannot produce a
fully masked softmax row; their K/V write goes to row 0's slot with row 0's values (`write_src` = 0), so
the duplicate write is harmless whatever order the device applies it in. Their logits are dropped.

Prefix attention reads the whole arena width once for all rows, `[H, B, D] @ [H, D, A]`, with each
row masked to its own span: every prefix in use is read once per step, as cascade attention reads it
(`attention.py`), instead of once per row. The price is compute over the other tasks' spans, B x A dot
products per head, which a bandwidth-bound GPU decode step absorbs for arenas of a few thousand positions
(the arena's capacity bounds it; a batch whose prefixes do not fit runs the eager step). One softmax over
[prefix span | own tokens] equals the eager step's log-sum-exp merge up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from modeling import gpt2
from server.engine.prefix_arena import PrefixArena

if TYPE_CHECKING:
    from server.engine.gpt2_parts import GPT2Parts

BlockOutput = Callable[[nn.Module, Tensor, Tensor, bool], Tensor]  # gpt2.block_output or its compiled form
NUM_ROW_FIELDS = 7  # token, position, write slot, write source, length, prefix lo, prefix hi


class BucketKey(NamedTuple):
    rows: int  # B
    width: int  # W
    arena: int  # A


def geometric_buckets(max_value: int, unit: int = 1) -> list[int]:
    """unit x (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ...) below max_value, then max_value rounded up to unit.

    Powers of two, and from 16 units on also 1.5x powers of two: padding wastes at most half a bucket.
    """
    top = -(-max_value // unit) * unit
    buckets: list[int] = []
    step = 1
    while step * unit < top:
        buckets.append(step * unit)
        if step >= 16 and step * 3 // 2 * unit < top:
            buckets.append(step * 3 // 2 * unit)
        step *= 2
    return [*buckets, top]


def bucket_for(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= value (None: larger than every bucket)."""
    return next((b for b in buckets if b >= value), None)


class StaticStep(NamedTuple):
    """One decode step in static form: what `static_forward` reads, built on the host."""

    request_ids: list[str]  # the N real rows, in the order of the first N logits rows
    key: BucketKey
    ints: list[int]  # [7 * B + B * W], the layout in the module docstring


def build_static_step(
    runner: GPT2Parts,
    arena: PrefixArena,
    decode_tokens: dict[str, int],
    row_buckets: list[int],
    width_buckets: list[int],
    arena_buckets: list[int],
) -> StaticStep | None:
    """Append this step's slots and lay out its inputs; None (changing nothing) when no bucket fits."""
    cache = runner.cache
    rows = cache.rows
    request_ids = list(decode_tokens)
    for rid in request_ids:
        if not rows[rid].prefilled:
            raise ValueError(f"request {rid!r} is still prefilling; it cannot decode")
    num_rows = bucket_for(len(request_ids), row_buckets)
    width = bucket_for(max(rows[r].length for r in request_ids) + 1, width_buckets)
    if num_rows is None or width is None:
        return None
    wanted = list(dict.fromkeys(rows[r].prefix_key for r in request_ids if rows[r].prefix_key is not None))
    spans = arena.place(wanted, cache.prefixes)
    if spans is None:
        return None
    spans[None] = (0, 0)  # no prefix: an empty span
    arena_width = bucket_for(arena.width, arena_buckets) if arena.width else 0
    if arena_width is None:
        return None

    fields: list[list[int]] = [[] for _ in range(NUM_ROW_FIELDS)]
    gather: list[int] = []
    for i, rid in enumerate(request_ids):
        row = rows[rid]
        position = row.prefix_length + row.length
        (slot,) = cache.append_slots(rid, 1)
        own = cache.slots(rid, row.length)  # includes this step's token
        lo, hi = spans[row.prefix_key]
        for field, value in zip(
            fields, (decode_tokens[rid], position, slot, i, row.length, lo, hi), strict=True
        ):
            field.append(value)
        gather += own + [own[0]] * (width - len(own))  # padding points at a written slot, and is masked
    for _ in range(num_rows - len(request_ids)):  # padding rows: copies of row 0, writing row 0's values
        for field in fields:
            field.append(field[0])
        gather += gather[:width]
    ints = [v for field in fields for v in field] + gather
    return StaticStep(request_ids, BucketKey(num_rows, width, arena_width), ints)


def static_forward(
    runner: GPT2Parts, arena: PrefixArena, ints: Tensor, key: BucketKey, block_output: BlockOutput
) -> Tensor:
    """The decode step over static shapes. ints: [7 * B + B * W] on the device. -> logits [B, V] float32."""
    B, W, A = key
    H, D, E = runner.num_heads, runner.head_dim, runner.hidden_size
    adt = runner.attention_dtype
    token_ids, positions, write_slots, write_src, lengths, lo, hi = ints[: NUM_ROW_FIELDS * B].view(
        NUM_ROW_FIELDS, B
    )  # each [B]
    gather = ints[NUM_ROW_FIELDS * B :]  # [B * W]
    steps = torch.arange(max(W, A), device=ints.device)
    mask = steps[None, :W] < lengths[:, None]  # [B, W] own tokens [0, length)
    if A:
        in_span = (steps[None, :A] >= lo[:, None]) & (steps[None, :A] < hi[:, None])  # [B, A]
        mask = torch.cat([in_span, mask], dim=1)  # [B, A + W]
    mask = mask[:, None, :]  # [B, 1, A + W]

    x = gpt2.embed(runner.model, token_ids, positions)  # [B, E]
    for layer, block in enumerate(runner.blocks):
        q, k, v = gpt2.qkv(block, x)  # each [B, E]
        pool_keys, pool_values = runner.cache.keys[layer], runner.cache.values[layer]  # [H, slots, D]
        pool_keys.index_copy_(1, write_slots, k.view(B, H, D).index_select(0, write_src).transpose(0, 1))
        pool_values.index_copy_(1, write_slots, v.view(B, H, D).index_select(0, write_src).transpose(0, 1))
        qh = q.view(B, H, 1, D).to(adt)  # [B, H, 1, D]
        own_k = pool_keys.index_select(1, gather).view(H, B, W, D).permute(1, 0, 3, 2).to(adt)  # [B, H, D, W]
        own_v = pool_values.index_select(1, gather).view(H, B, W, D).transpose(0, 1).to(adt)  # [B, H, W, D]
        scores = torch.matmul(qh, own_k).squeeze(2)  # [B, H, W]
        if A:
            arena_k = arena.keys[layer, :, :A].to(adt)  # [H, A, D]
            prefix_scores = torch.matmul(qh.squeeze(2).transpose(0, 1), arena_k.transpose(1, 2))  # [H, B, A]
            scores = torch.cat([prefix_scores.transpose(0, 1), scores], dim=-1)  # [B, H, A + W]
        scores = (scores * runner.scales[layer]).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H, A + W]
        out = torch.matmul(probs[..., A:].unsqueeze(2), own_v).squeeze(2)  # [B, H, D]
        if A:
            arena_v = arena.values[layer, :, :A].to(adt)  # [H, A, D]
            out = out + torch.matmul(probs[..., :A].transpose(0, 1), arena_v).transpose(0, 1)  # [B, H, D]
        x = block_output(block, x, out.reshape(B, E).to(runner.dtype), runner.fused_gelu)  # [B, E]
    return gpt2.lm_logits(runner.model, x).float()  # [B, V]

"""Shared-prefix attention: every task's prefix read once for all its rows, in one batched product.

Softmax attention over a concatenation of key sets A (the task's prefix) and B (the row's own tokens)
is one softmax over the concatenated scores, so the prefix scores need not come from a per-row copy of
the prefix: they are computed for a whole group of rows at once, `[H, n*Q, D] @ [H, D, L]` (a
matrix-matrix product instead of a matrix-vector product per row), for every group in one batched
matmul over the stacked prefixes `[H, G, Lk, D]` (`prefix_layout.py` says how rows and prefixes are
laid out), then joined with each row's own scores before the softmax:

    p = softmax([q K_prefix^T | q K_own^T] * scale + bias);   out = p[:, :Lk] V_prefix + p[:, Lk:] V_own

which is exactly PEFT's attention over [prefix | own tokens] (the additive `bias` is -inf where a slot
may not look: another task's prefix columns, padding, the future). Inputs are in the attention dtype
and head-major (`[H, slots, ...]`, as the KV pool stores them), so the batched products need no copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cascade_attention(
    q: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    bias: torch.Tensor,
    prefix_keys: torch.Tensor | None,
    prefix_values: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of each slot's queries over [its prefix columns | its own tokens]. Head-major layout.

    q: [H, G*n, Q, D] (slots grouped by prefix, n per group); own_keys/own_values: [H, G*n, S, D];
    prefix_keys/prefix_values: [H, G, Lk, D], or None when no slot has a prefix; bias: additive,
    [G*n, Q, Lk + S] (prefix columns first; [G*n, Q, S] without a prefix), 0 where the slot may attend
    and -inf where not, with at least one own key open to every query. Returns [H, G*n, Q, D].
    """
    if prefix_keys is None or prefix_values is None:
        # heads as SDPA's batch and slots as its heads: each (head, slot) pair is independent anyway
        return F.scaled_dot_product_attention(q, own_keys, own_values, attn_mask=bias, scale=scale)
    H, slots, Q, D = q.shape
    G, Lk = prefix_keys.shape[1], prefix_keys.shape[2]
    q = (q * scale).contiguous()  # [H, G*n, Q, D]
    s_prefix = torch.matmul(q.view(H, G, -1, D), prefix_keys.transpose(-1, -2))  # [H, G, n*Q, Lk]
    s_own = torch.matmul(q, own_keys.transpose(-1, -2))  # [H, G*n, Q, S]
    scores = torch.cat([s_prefix.view(H, slots, Q, Lk), s_own], dim=-1)  # [H, G*n, Q, Lk+S]
    p = torch.softmax(scores.add_(bias), dim=-1)  # [H, G*n, Q, Lk+S]
    o_prefix = torch.matmul(p[..., :Lk].view(H, G, -1, Lk), prefix_values)  # [H, G, n*Q, D]
    o_own = torch.matmul(p[..., Lk:], own_values)  # [H, G*n, Q, D]
    return o_own.add_(o_prefix.view(H, slots, Q, D))  # [H, G*n, Q, D]

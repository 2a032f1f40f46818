"""Shared-prefix attention: every task's prefix read once for all its rows, in one batched product.

Softmax attention over a concatenation of key sets A (the task's prefix) and B (the row's own tokens)
is one softmax over the concatenated scores, so the prefix scores need not come from a per-row copy of
the prefix: they are computed for a whole group of rows at once, `[H, n*Q, D] @ [H, D, L]` (a
matrix-matrix product instead of a matrix-vector product per row), for every group in one batched
matmul over the stacked prefixes `[G, H, Lk, D]` (`prefix_layout.py` says how rows and prefixes are
laid out), then joined with each row's own scores before the softmax:

    p = softmax([q K_prefix^T | q K_own^T] * scale + bias);   out = p[:, :Lk] V_prefix + p[:, Lk:] V_own

which is exactly PEFT's attention over [prefix | own tokens] (the additive `bias` is -inf where a slot
may not look: another task's prefix columns, padding, the future). Inputs are in the attention dtype.
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
    """Attention of each slot's queries over [its prefix columns | its own tokens].

    q: [G*n, H, Q, D] (slots grouped by prefix, n per group); own_keys/own_values: [G*n, H, S, D];
    prefix_keys/prefix_values: [G, H, Lk, D], or None when no slot has a prefix; bias: additive,
    [G*n, 1, Q, Lk + S] (prefix columns first; [G*n, 1, Q, S] without a prefix), 0 where the slot may
    attend and -inf where not, with at least one own key open to every query. Returns [G*n, H, Q, D].
    """
    if prefix_keys is None or prefix_values is None:
        return F.scaled_dot_product_attention(q, own_keys, own_values, attn_mask=bias, scale=scale)
    slots, H, Q, D = q.shape
    G, _, Lk, _ = prefix_keys.shape
    S = own_keys.shape[2]
    n = slots // G
    q = q * scale  # [G*n, H, Q, D]
    q_groups = q.view(G, n, H, Q, D).transpose(1, 2).reshape(G, H, n * Q, D)  # [G, H, n*Q, D]
    s_prefix = torch.matmul(q_groups, prefix_keys.transpose(-1, -2))  # [G, H, n*Q, Lk]
    s_own = torch.matmul(q, own_keys.transpose(-1, -2))  # [G*n, H, Q, S]
    scores = torch.cat(
        [s_prefix.view(G, H, n, Q, Lk).transpose(1, 2), s_own.view(G, n, H, Q, S)], dim=-1
    )  # [G, n, H, Q, Lk+S]
    p = torch.softmax(scores.view(slots, H, Q, Lk + S).add_(bias), dim=-1)  # [G*n, H, Q, Lk+S]
    p_prefix = p[..., :Lk].view(G, n, H, Q, Lk).transpose(1, 2).reshape(G, H, n * Q, Lk)  # [G, H, n*Q, Lk]
    o_prefix = torch.matmul(p_prefix, prefix_values)  # [G, H, n*Q, D]
    o_own = torch.matmul(p[..., Lk:], own_values)  # [G*n, H, Q, D]
    out = o_own.view(G, n, H, Q, D) + o_prefix.view(G, H, n, Q, D).transpose(1, 2)  # [G, n, H, Q, D]
    return out.view(slots, H, Q, D)

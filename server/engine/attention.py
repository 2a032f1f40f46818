"""Cascade (shared-prefix) attention: a task's prefix read once for all its rows, merged by log-sum-exp.

Softmax attention over a concatenation of key sets A (the task's prefix) and B (the row's own tokens)
can be computed per part and merged exactly: with per-part running maxima m_A, m_B, sums
l_A = sum exp(s_A - m_A), l_B likewise, and unnormalised outputs o_A = exp(s_A - m_A) @ V_A, o_B:

    m = max(m_A, m_B);  out = (o_A e^(m_A - m) + o_B e^(m_B - m)) / (l_A e^(m_A - m) + l_B e^(m_B - m))

which is softmax([s_A | s_B]) @ [V_A | V_B] (FlashAttention's rescaling, FlashInfer's cascade). The
prefix part of all rows of one task is one matrix-matrix product `[H, rows*Q, D] @ [H, D, L]` instead of
a matrix-vector product per row over a private copy.
"""

from __future__ import annotations

import torch


class PrefixGroup:
    """Rows [start, end) of an attention call that read the same prefix `keys`/`values`: [H, L, D]."""

    __slots__ = ("start", "end", "keys", "values")

    def __init__(self, start: int, end: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.start, self.end, self.keys, self.values = start, end, keys, values


def cascade_attention(
    q: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    own_mask: torch.Tensor,
    groups: list[PrefixGroup],
    scale: float,
) -> torch.Tensor:
    """Attention of `q` over [its group's prefix | its own tokens]. Computed in q's dtype.

    q: [R, H, Q, D]; own_keys/own_values: [R, H, S, D]; own_mask: [R, 1, Q, S] (True = may attend;
    every query row must allow at least one own key). Rows outside every group have no prefix.
    Returns [R, H, Q, D].
    """
    scores = torch.matmul(q, own_keys.transpose(-1, -2)) * scale  # [R, H, Q, S]
    scores = scores.masked_fill(~own_mask, float("-inf"))
    m_own = scores.amax(dim=-1, keepdim=True)  # [R, H, Q, 1]
    p_own = torch.exp(scores - m_own)  # [R, H, Q, S]
    l_own = p_own.sum(dim=-1, keepdim=True)  # [R, H, Q, 1]
    out = torch.matmul(p_own, own_values)  # [R, H, Q, D] unnormalised
    R, H, Q, D = q.shape
    for g in groups:
        n = g.end - g.start
        qg = q[g.start : g.end].transpose(0, 1).reshape(H, n * Q, D)  # [H, n*Q, D]
        s = torch.matmul(qg, g.keys.transpose(-1, -2)) * scale  # [H, n*Q, L]
        m_pre = s.amax(dim=-1, keepdim=True)  # [H, n*Q, 1]
        p = torch.exp(s - m_pre)  # [H, n*Q, L]
        l_pre = p.sum(dim=-1, keepdim=True).view(H, n, Q, 1).transpose(0, 1)  # [n, H, Q, 1]
        o_pre = torch.matmul(p, g.values).view(H, n, Q, D).transpose(0, 1)  # [n, H, Q, D]
        m_pre = m_pre.view(H, n, Q, 1).transpose(0, 1)  # [n, H, Q, 1]
        m_o = m_own[g.start : g.end]  # [n, H, Q, 1]
        m = torch.maximum(m_o, m_pre)
        a_own, a_pre = torch.exp(m_o - m), torch.exp(m_pre - m)  # [n, H, Q, 1] each
        out[g.start : g.end] = out[g.start : g.end] * a_own + o_pre * a_pre
        l_own[g.start : g.end] = l_own[g.start : g.end] * a_own + l_pre * a_pre
    return out / l_own  # [R, H, Q, D]

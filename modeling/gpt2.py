"""The one GPT-2 prefix forward: plain, differentiable functions over a loaded `GPT2LMHeadModel`'s weights.

gpt-fast / nanoGPT style: no module surgery, no HF cache objects or cache kwargs, each step spelled out
with its shapes. The per-layer pieces are separate functions so that users with their own KV layout
(the engine's slot cache) run the same arithmetic:

    x = embed(model, ids, positions)            # [..., E]
    for i, block in enumerate(blocks(model)):
        q, k, v = qkv(block, x)                  # each [..., E]   (ln_1, then c_attn)
        a = attend(heads(q), heads(k), heads(v), mask, scales[i], upcast)   # [B, H, S, D]
        x = block_output(block, x, merge_heads(a))   # [..., E]   (c_proj + residual, ln_2 + MLP + residual)
    logits = lm_logits(model, x)                 # [..., V]

`forward(model, input_ids, attention_mask, prefix_kv)` is the full model with a prefix: prefix
keys/values sit before the tokens in every layer, are always visible, and take the positions
`0..L-1`, so **real tokens' positions start at L** (as in PEFT and the paper's code; the engine's
runner numbers them the same way). A prefix is `[num_layers, 2, H, L, D]` (shared by every row) or
`[num_layers, 2, B, H, L, D]` (one per row), index 0 of dim 1 = key, 1 = value.

`extend` is the same forward that also returns the keys/values it saw, so a caller can feed them back
as the next call's `prefix_kv` (with `prefix_mask` for padding): cached decoding without a cache class.

Numerics follow HF's GPT-2 with "sdpa" attention (same modules, same order, each layer's own
`attn.scaling`, `reorder_and_upcast_attn` as float32 attention in half precision), so logits equal HF
PEFT's to float rounding (tests/modeling/test_gpt2.py). Dropout is never applied (the frozen model is in
eval mode) and nothing is detached, so gradients reach the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.bart_prefix import expand_prefix


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a `GPT2LMHeadModel`, in order."""
    return list(model.transformer.h)


def layer_scales(model: nn.Module) -> list[float]:
    """Each layer's softmax scale, exactly as HF computes it (1/sqrt(D), and 1/(layer+1) when configured)."""
    return [float(block.attn.scaling) for block in blocks(model)]


def upcast_attention(model: nn.Module) -> bool:
    """Whether attention runs in float32 (`reorder_and_upcast_attn` with a half-precision model)."""
    dtype = model.get_input_embeddings().weight.dtype
    return bool(model.config.reorder_and_upcast_attn) and dtype != torch.float32


def tanh_gelu(model: nn.Module) -> bool:
    """Whether the MLP's activation is the tanh GELU (so `mlp(..., fused_gelu=True)` computes it)."""
    return model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")


def embed(model: nn.Module, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """Token + position embeddings. input_ids, position_ids: [...] -> [..., E]."""
    return model.transformer.wte(input_ids) + model.transformer.wpe(position_ids)


def qkv(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key, value projections of the residual stream x: [..., E] -> three [..., E]."""
    return block.attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=-1)


def heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, S, E] -> [B, H, S, D]."""
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    batch, num_heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, upcast: bool = False
) -> Tensor:
    """Softmax attention. q: [B, H, S, D]; k, v: [B, H, K, D]; mask: bool [B, 1, S, K] (True = may attend).

    Returns [B, H, S, D] in q's dtype; `upcast` computes it in float32 (HF's `reorder_and_upcast_attn`).
    """
    if upcast:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def mlp(block: nn.Module, x: Tensor, fused_gelu: bool = False) -> Tensor:
    """The block's MLP on an already normalised x: [..., E] -> [..., E].

    `fused_gelu` (only where `tanh_gelu(model)`): GPT-2's "gelu_new" as one `F.gelu(approximate="tanh")`
    kernel, the same formula as HF's `NewGELUActivation` up to float rounding (~1e-7) and several times
    faster (the engine's choice; the default is HF's own module).
    """
    if fused_gelu:
        return block.mlp.c_proj(F.gelu(block.mlp.c_fc(x), approximate="tanh"))
    return block.mlp(x)


def block_output(block: nn.Module, x: Tensor, attn: Tensor, fused_gelu: bool = False) -> Tensor:
    """The rest of a block after attention. x: [..., E] residual; attn: [..., E] heads merged -> [..., E]."""
    x = x + block.attn.c_proj(attn)  # [..., E]
    return x + mlp(block, block.ln_2(x), fused_gelu)  # [..., E]


def lm_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Final layer norm and the (tied) LM head: [..., E] -> [..., V]."""
    return model.lm_head(model.transformer.ln_f(x))


def forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    prefix_kv: Tensor | None = None,
    *,
    position_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
) -> Tensor:
    """GPT-2 logits [B, S, V] for input_ids [B, S] after a prefix (see the module docstring).

    attention_mask: [B, S], 1 = real token, 0 = padding (never attended to); None = all real.
    position_ids: [B, S]; default `L + arange(S)` (right padding, or none). Left-padded rows pass
    their own (the j-th real token at L + j).
    prefix_mask: [B, L], 1 = visible; default all visible (a prefix is never masked; a past fed back
    from `extend` over padded rows is).
    """
    logits, _ = extend(
        model, input_ids, attention_mask, prefix_kv, position_ids=position_ids, prefix_mask=prefix_mask
    )
    return logits


def extend(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    prefix_kv: Tensor | None = None,
    *,
    position_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`forward`, also returning the keys/values seen: (logits [B, S, V], kv [num_layers, 2, B, H, L+S, D])."""
    batch, seq = input_ids.shape
    device = input_ids.device
    dtype = model.get_input_embeddings().weight.dtype
    num_heads = int(model.config.n_head)
    past = expand_prefix(prefix_kv, batch, dtype)  # [layers, 2, B, H, L, D] or None
    num_past = 0 if past is None else past.shape[4]
    if position_ids is None:
        position_ids = (num_past + torch.arange(seq, device=device)).expand(batch, seq)  # [B, S]
    mask = _attention_mask(batch, seq, num_past, attention_mask, prefix_mask, device)  # [B, 1, S, L+S]
    scales, upcast = layer_scales(model), upcast_attention(model)

    x = embed(model, input_ids, position_ids)  # [B, S, E]
    seen = []
    for layer, block in enumerate(blocks(model)):
        q, k, v = (heads(t, num_heads) for t in qkv(block, x))  # each [B, H, S, D]
        if past is not None:
            k = torch.cat([past[layer, 0], k], dim=2)  # [B, H, L+S, D]
            v = torch.cat([past[layer, 1], v], dim=2)  # [B, H, L+S, D]
        seen.append(torch.stack([k, v]))  # [2, B, H, L+S, D]
        a = attend(q, k, v, mask, scales[layer], upcast)  # [B, H, S, D]
        x = block_output(block, x, merge_heads(a))  # [B, S, E]
    return lm_logits(model, x), torch.stack(seen)  # [B, S, V], [layers, 2, B, H, L+S, D]


def _attention_mask(
    batch: int,
    seq: int,
    num_past: int,
    attention_mask: Tensor | None,
    prefix_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """bool [B, 1, S, L+S]: past entries (unless masked) and causal real tokens; each query sees itself.

    A query always seeing its own key keeps padded query rows from being fully masked (no NaN); their
    outputs are never used, and real queries never see a padded key.
    """
    steps = torch.arange(seq, device=device)
    causal = steps[None, :] <= steps[:, None]  # [S, S] key j visible to query i
    tokens = causal.expand(batch, seq, seq)  # [B, S, S]
    if attention_mask is not None:
        tokens = tokens & attention_mask.bool()[:, None, :]  # [B, S, S]
        tokens = tokens | torch.eye(seq, dtype=torch.bool, device=device)  # [B, S, S]
    past = torch.ones(batch, seq, num_past, dtype=torch.bool, device=device)  # [B, S, L]
    if prefix_mask is not None:
        past = past & prefix_mask.bool()[:, None, :]  # [B, S, L]
    return torch.cat([past, tokens], dim=2)[:, None]  # [B, 1, S, L+S]

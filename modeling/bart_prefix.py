"""A plain, differentiable functional forward of HF BART with prefixes in all three attention kinds.

This is the reference the BART engine runner is tested against, and the forward the trainer trains
prefixes through. It reuses the weights of a loaded `BartForConditionalGeneration` (no copies, no
module surgery) and spells out every step of HF's forward so that where each prefix goes is visible:

- **encoder self-attention** sees keys/values `[encoder prefix | source tokens]`. Source positions
  start at 0: the encoder has no cache, and the prefix takes no position (as in the paper's code).
- **decoder self-attention** sees `[decoder prefix | target tokens]`, causal over the targets, the
  prefix always visible. Target positions start at `L_decoder` (HF/PEFT convention: the cache already
  holds L entries when the first target token arrives; same rule as GPT-2).
- **decoder cross-attention** sees `[cross prefix | K/V projected from the encoder outputs]`. Prefix
  entries are never masked; encoder padding is.

A prefix is `[num_layers, 2, B, H, L, D]` (one per row) or `[num_layers, 2, H, L, D]` (the same for
every row; broadcast), index 0 of dim 1 being the key and 1 the value; `None` means no prefix of that
kind. Encoder prefixes have `num_encoder_layers` layers and `num_encoder_heads` heads; decoder and
cross prefixes the decoder's.

Source sequences in a batch are right- or left-padded with `attention_mask` marking real tokens;
encoder positions are numbered over the padded tensor, exactly as HF does. Target sequences carry no
mask: the causal mask makes right padding harmless (pad positions' logits are just ignored).

Dropout is never applied (the frozen model runs as in eval mode) but nothing is detached, so the
functions are differentiable with respect to the prefixes (and the weights, if they require grad).
HF's float16 overflow clamp in the encoder is not reproduced (it reads the device to decide).

The BART tokenizer bundled here does not add specials itself: the encoder input is
`[bos] + ids + [eos]` (`wrap_source`), and decoding starts from `config.decoder_start_token_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BartForConditionalGeneration, PretrainedConfig


def wrap_source(ids: Sequence[int], config: PretrainedConfig) -> list[int]:
    """The encoder input for source token ids: `[bos] + ids + [eos]` (what HF's BART tokenizer adds)."""
    return [int(config.bos_token_id), *(int(i) for i in ids), int(config.eos_token_id)]


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, -1, head_dim).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def expand_prefix(prefix: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor | None:
    """A prefix as `[num_layers, 2, B, H, L, D]` in `dtype`; a `[num_layers, 2, H, L, D]` one is broadcast."""
    if prefix is None:
        return None
    if prefix.dim() == 5:
        prefix = prefix.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)
    if prefix.dim() != 6 or prefix.shape[1] != 2 or prefix.shape[2] != batch:
        raise ValueError(
            f"prefix must be [layers, 2, B={batch}, H, L, D] or [layers, 2, H, L, D], "
            f"got {list(prefix.shape)}"
        )
    return prefix.to(dtype)


def masked_attention(
    attn: nn.Module, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None
) -> Tensor:
    """Attention with `attn.scaling` before the output projection: query [B, H, T, D], keys/values
    [B, H, K, D], mask bool (True = may attend) broadcastable to [B, H, T, K]. -> [B, H, T, D]."""
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attn.scaling)


def attend(attn: nn.Module, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
    """Multi-head attention with a BartAttention's scaling and output projection.

    query: [B, H, T, D]; keys/values: [B, H, K, D]; mask: bool, True = may attend, broadcastable to
    [B, H, T, K]. Returns [B, T, d_model].
    """
    return attn.out_proj(_merge_heads(masked_attention(attn, query, keys, values, mask)))  # [B, T, d]


def feed_forward(layer: nn.Module, hidden: Tensor) -> Tensor:
    """The post-norm FFN block shared by encoder and decoder layers: [B, S, d] -> [B, S, d]."""
    ffn = layer.fc2(layer.activation_fn(layer.fc1(hidden)))  # [B, S, d]
    return layer.final_layer_norm(hidden + ffn)


def encode(
    model: BartForConditionalGeneration,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    encoder_prefix: Tensor | None = None,
    encoder_prefix_mask: Tensor | None = None,
) -> Tensor:
    """Run the encoder with an optional encoder self-attention prefix.

    input_ids: [B, S] (already wrapped in bos/eos); attention_mask: [B, S] (1 = token, 0 = padding);
    encoder_prefix: [layers_enc, 2, (B,) H, L, D]; encoder_prefix_mask: [B, L] bool, for rows whose
    prefixes are shorter than L (padded; False entries are ignored). Returns the outputs [B, S, d].
    """
    encoder = model.get_encoder()
    batch, seq = input_ids.shape
    embeds = encoder.embed_tokens(input_ids)  # [B, S, d], embed_scale applied inside
    positions = encoder.embed_positions(input_ids)  # [B, S, d]: positions 0..S-1 (+ offset 2 inside)
    hidden = encoder.layernorm_embedding(embeds + positions)  # [B, S, d]
    prefix = expand_prefix(encoder_prefix, batch, hidden.dtype)  # [layers, 2, B, H, L, D] | None
    prefix_len = 0 if prefix is None else prefix.shape[4]
    if attention_mask is None:
        token_mask = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)  # [B, S]
    else:
        token_mask = attention_mask.to(torch.bool)
    if encoder_prefix_mask is None:
        prefix_mask = torch.ones(batch, prefix_len, dtype=torch.bool, device=input_ids.device)  # [B, L]
    else:
        prefix_mask = encoder_prefix_mask.to(torch.bool)
    mask = torch.cat([prefix_mask, token_mask], dim=1)[:, None, None, :]  # [B, 1, 1, L + S]
    for i, layer in enumerate(encoder.layers):
        attn = layer.self_attn
        query = _heads(attn.q_proj(hidden), attn.head_dim)  # [B, H, S, D]
        keys = _heads(attn.k_proj(hidden), attn.head_dim)  # [B, H, S, D]
        values = _heads(attn.v_proj(hidden), attn.head_dim)  # [B, H, S, D]
        if prefix is not None:
            keys = torch.cat([prefix[i, 0], keys], dim=2)  # [B, H, L + S, D]
            values = torch.cat([prefix[i, 1], values], dim=2)  # [B, H, L + S, D]
        hidden = layer.self_attn_layer_norm(hidden + attend(attn, query, keys, values, mask))  # [B, S, d]
        hidden = feed_forward(layer, hidden)  # [B, S, d]
    return hidden


def cross_keys_values(
    model: BartForConditionalGeneration, enc_hidden: Tensor, cross_prefix: Tensor | None
) -> list[tuple[Tensor, Tensor]]:
    """Per decoder layer, the cross-attention keys/values `[cross prefix | projected encoder outputs]`.

    enc_hidden: [B, S, d]; cross_prefix: [layers, 2, (B,) H, L, D]. Returns per layer (keys, values),
    each [B, H, L + S, D]. Computed once per request: they do not depend on the decoder tokens.
    """
    decoder = model.get_decoder()
    prefix = expand_prefix(
        cross_prefix, enc_hidden.shape[0], enc_hidden.dtype
    )  # [layers, 2, B, H, L, D] | None
    out = []
    for i, layer in enumerate(decoder.layers):
        attn = layer.encoder_attn
        keys = _heads(attn.k_proj(enc_hidden), attn.head_dim)  # [B, H, S, D]
        values = _heads(attn.v_proj(enc_hidden), attn.head_dim)  # [B, H, S, D]
        if prefix is not None:
            keys = torch.cat([prefix[i, 0], keys], dim=2)  # [B, H, L + S, D]
            values = torch.cat([prefix[i, 1], values], dim=2)  # [B, H, L + S, D]
        out.append((keys, values))
    return out


def cross_mask(
    enc_mask: Tensor | None, batch: int, seq: int, prefix_len: int, device: torch.device
) -> Tensor:
    """Cross-attention key mask [B, 1, 1, L + S]: prefix entries always visible, encoder padding masked."""
    if enc_mask is None:
        enc_mask = torch.ones(batch, seq, dtype=torch.bool, device=device)  # [B, S]
    ones = torch.ones(batch, prefix_len, dtype=torch.bool, device=device)  # [B, L]
    return torch.cat([ones, enc_mask.to(torch.bool)], dim=1)[:, None, None, :]  # [B, 1, 1, L + S]


def lm_logits(model: BartForConditionalGeneration, hidden: Tensor) -> Tensor:
    """Decoder hidden states [B, T, d] -> logits [B, T, V] (lm_head + final_logits_bias)."""
    return model.lm_head(hidden) + model.final_logits_bias.to(hidden.dtype)


def decoder_embed(model: BartForConditionalGeneration, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """Decoder input: token + learned position embeddings, then `layernorm_embedding`.

    input_ids: [B, T]; position_ids: [B, T] or [T] (0-based; BART's offset of 2 is added here).
    Returns [B, T, d].
    """
    decoder = model.get_decoder()
    embeds = decoder.embed_tokens(input_ids)  # [B, T, d], embed_scale applied inside
    table = decoder.embed_positions
    positions = F.embedding(position_ids + table.offset, table.weight)  # [(B,) T, d]
    return decoder.layernorm_embedding(embeds + positions)  # [B, T, d]


SelfAttention = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""`(layer index, query, new keys, new values) -> attention output` for decoder self-attention: gets
the query and the keys/values of the tokens being fed, [B, H, T, D] each, and returns softmax attention
over everything the query sees (prefix, earlier tokens, the new ones) before the output projection,
[B, H, T, D]. This is where a caller's cache layout (and its attention kernel) goes."""

CrossAttention = Callable[[int, Tensor], Tensor]
"""`(layer index, query [B, H, T, D]) -> attention output [B, H, T, D]` over `[cross prefix | encoder
K/V]` (the keys and values are the caller's: computed once per request, e.g. by `cross_keys_values`)."""


def decoder_layer(
    layer: nn.Module,
    hidden: Tensor,
    self_attention: Callable[[Tensor, Tensor, Tensor], Tensor],
    cross_attention: Callable[[Tensor], Tensor],
) -> Tensor:
    """One BART decoder layer (post-norm): self-attention, cross-attention, feed-forward.

    hidden: [B, T, d]; self_attention: (query, new keys, new values), [B, H, T, D] each -> attention
    output [B, H, T, D]; cross_attention: query [B, H, T, D] -> [B, H, T, D]. The projections (q/k/v in,
    out_proj out), residuals and norms are here; what the queries attend over is the callbacks'.
    Returns [B, T, d].
    """
    attn = layer.self_attn
    out = self_attention(
        _heads(attn.q_proj(hidden), attn.head_dim),
        _heads(attn.k_proj(hidden), attn.head_dim),
        _heads(attn.v_proj(hidden), attn.head_dim),
    )  # [B, H, T, D]
    hidden = layer.self_attn_layer_norm(hidden + attn.out_proj(_merge_heads(out)))  # [B, T, d]
    xattn = layer.encoder_attn
    x_out = cross_attention(_heads(xattn.q_proj(hidden), xattn.head_dim))  # [B, H, T, D]
    hidden = layer.encoder_attn_layer_norm(hidden + xattn.out_proj(_merge_heads(x_out)))
    return feed_forward(layer, hidden)  # [B, T, d]


def decoder_layers(
    model: BartForConditionalGeneration,
    hidden: Tensor,
    self_attention: SelfAttention,
    cross_attention: CrossAttention,
) -> Tensor:
    """Every decoder layer in order over `hidden` [B, T, d] (from `decoder_embed`) -> [B, T, d].

    `self_attention(i, ...)` and `cross_attention(i, ...)` compute layer i's attention
    (`SelfAttention`, `CrossAttention`).
    """
    for i, layer in enumerate(model.get_decoder().layers):
        hidden = decoder_layer(layer, hidden, partial(self_attention, i), partial(cross_attention, i))
    return hidden


def decode(
    model: BartForConditionalGeneration,
    decoder_input_ids: Tensor,
    enc_hidden: Tensor,
    enc_mask: Tensor | None = None,
    decoder_prefix: Tensor | None = None,
    cross_prefix: Tensor | None = None,
) -> Tensor:
    """Run the decoder over whole target sequences (no cache) with optional decoder and cross prefixes.

    decoder_input_ids: [B, T] starting with `decoder_start_token_id`; enc_hidden: [B, S, d] from
    `encode`; enc_mask: [B, S] (1 = token); prefixes: [layers, 2, (B,) H, L, D]. Target positions start
    at L_decoder. Returns logits [B, T, V].
    """
    batch, tgt = decoder_input_ids.shape
    device = decoder_input_ids.device
    self_prefix = expand_prefix(decoder_prefix, batch, enc_hidden.dtype)  # [layers, 2, B, H, Ld, D] | None
    self_len = 0 if self_prefix is None else self_prefix.shape[4]
    position_ids = torch.arange(self_len, self_len + tgt, device=device)  # [T]: targets start at L_decoder
    hidden = decoder_embed(model, decoder_input_ids, position_ids)  # [B, T, d]
    causal = torch.ones(tgt, tgt, dtype=torch.bool, device=device).tril()  # [T, T]
    seen = torch.ones(tgt, self_len, dtype=torch.bool, device=device)  # [T, Ld]: prefix always visible
    self_mask = torch.cat([seen, causal], dim=1)  # [T, Ld + T], broadcast over [B, H]
    cross = cross_keys_values(model, enc_hidden, cross_prefix)  # per layer [B, H, Lc + S, D] x 2
    cross_len = 0 if cross_prefix is None else cross_prefix.shape[-2]
    x_mask = cross_mask(enc_mask, batch, enc_hidden.shape[1], cross_len, device)  # [B, 1, 1, Lc + S]

    layers = model.get_decoder().layers

    def self_attention(i: int, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        if self_prefix is not None:
            keys = torch.cat([self_prefix[i, 0], keys], dim=2)  # [B, H, Ld + T, D]
            values = torch.cat([self_prefix[i, 1], values], dim=2)
        return masked_attention(layers[i].self_attn, query, keys, values, self_mask)  # [B, H, T, D]

    def cross_attention(i: int, query: Tensor) -> Tensor:
        return masked_attention(layers[i].encoder_attn, query, *cross[i], x_mask)  # [B, H, T, D]

    hidden = decoder_layers(model, hidden, self_attention, cross_attention)  # [B, T, d]
    return lm_logits(model, hidden)  # [B, T, V]


@torch.no_grad()
def greedy_generate(
    model: BartForConditionalGeneration,
    input_ids: Sequence[int] | Tensor,
    prefixes: Mapping[str, Tensor] | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | None = -1,
) -> list[int]:
    """Greedy generation for one request: the plain reference (re-runs the whole decoder every step).

    input_ids: the encoder input [S] exactly as fed (use `wrap_source` for bos/eos); prefixes: kind ->
    `[layers, 2, H, L, D]` for any subset of "encoder", "decoder", "cross" (e.g. `artifact.prefixes`).
    Returns the generated ids (without the decoder start token), stopping after `eos_token_id` (the
    config's eos by default; None = never stop early) or `max_new_tokens`.
    """
    prefixes = dict(prefixes or {})
    unknown = set(prefixes) - {"encoder", "decoder", "cross"}
    if unknown:
        raise ValueError(f"unknown prefix kinds {sorted(unknown)}")
    if eos_token_id == -1:
        eos_token_id = model.config.eos_token_id
    device = model.get_input_embeddings().weight.device
    src = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)  # [1, S]
    enc_hidden = encode(model, src, None, prefixes.get("encoder"))  # [1, S, d]
    tokens = [int(model.config.decoder_start_token_id)]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        tgt = torch.tensor([tokens], dtype=torch.long, device=device)  # [1, T]
        logits = decode(
            model, tgt, enc_hidden, None, prefixes.get("decoder"), prefixes.get("cross")
        )  # [1, T, V]
        next_id = int(logits[0, -1].argmax())
        generated.append(next_id)
        tokens.append(next_id)
        if eos_token_id is not None and next_id == eos_token_id:
            break
    return generated

# No `from __future__ import annotations` here (as in model.py): vLLM inspects the model's signatures.
"""Our prefix-tuned BART for vLLM: the paper's three prefixes, each request its own task's.

The prefix table (`BartPrefixTable`) holds, per row, one prefix position of each kind (docs/
encoder-decoder.md): its encoder self-attention key/value in every encoder layer, its decoder
self-attention key/value and its cross-attention key/value in every decoder layer. A task's prefix
takes max(Le, Ld, Lc) rows; its kinds use the first Le, Ld, Lc of them. A request names its rows in
three places, one per attention (`bart_prompt.py` builds them):

- **decoder self-attention**: the decoder prompt is `[Ld virtual ids] + [decoder_start]`, a virtual id
  being `text_vocab_size + row` (as for GPT-2, `model.py`). In every decoder layer the keys/values at
  the virtual positions are replaced by the rows' before vLLM's attention caches them, so target
  positions start at Ld (vLLM numbers the virtual positions 0..Ld-1), as in HF/PEFT.
- **encoder self-attention**: the encoder runs in `embed_multimodal` (vLLM runs an encoder-decoder
  model's encoder as a multimodal encoder, `bart_inputs.py`): our own attention over
  `[Le prefix entries | S source tokens]`, source positions from 0, no cache.
- **cross-attention**: vLLM projects the keys/values of a request's cross-attention once, from what
  `embed_multimodal` returned for it, when the request's decoder first runs, and caches them. We
  return `Lc + S` vectors, the first Lc standing for the cross prefix rows: the decoder layer replaces
  the keys/values projected from those by the rows', where they are made (before vLLM caches them).

Which row a returned encoder vector stands for travels with it: `embed_multimodal` returns
`[Lc + S, d_model + 2]`, the last two columns `row + 1` in base 256 (0 for a source token). Integers
up to 256 are exact in bf16 and fp16, so the code survives the model's dtype; the decoder splits it
off before projecting.

Not compiled (no `support_torch_compile`): the decoder's cross-attention inputs exist only on the
steps where a request joins, and vLLM's compiled graph assumes an argument is always or never None.
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention, CrossAttention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionType

from server.vllm_backend.bart_inputs import (
    FIELDS,
    PrefixBartDummyInputsBuilder,
    PrefixBartProcessingInfo,
    PrefixBartProcessor,
)

KINDS = ("encoder", "decoder", "cross")
CODE_BASE = 256  # see the module docstring: a row travels as two exact base-256 digits of row + 1
POSITION_OFFSET = 2  # BART's learned positions are stored from index 2


def row_code(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows [n] -> [n, 2] (hi, lo digits of row + 1) in `dtype`."""
    shifted = rows + 1
    return torch.stack([shifted // CODE_BASE, shifted % CODE_BASE], dim=-1).to(dtype)


def decode_row_code(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """code [n, 2] -> (is_prefix [n, 1] bool, rows [n], 0 where not a prefix entry)."""
    shifted = code[:, 0].round().long() * CODE_BASE + code[:, 1].round().long()  # [n]
    return (shifted > 0).unsqueeze(-1), (shifted - 1).clamp(min=0)


class BartPrefixTable(nn.Module):
    """The prefix rows of every kind, written in place between steps (never reallocated).

    kv[kind]: [layers of the kind, 2 (key, value), rows, d_model] in the model's dtype; not a weight.
    """

    def __init__(self, config: Any, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.d_model = int(config.d_model)
        self.num_layers = {
            "encoder": int(config.encoder_layers),
            "decoder": int(config.decoder_layers),
            "cross": int(config.decoder_layers),
        }
        for kind in KINDS:
            self.register_buffer(
                f"{kind}_kv", torch.zeros(self.num_layers[kind], 2, rows, self.d_model), persistent=False
            )

    def kv(self, kind: str) -> torch.Tensor:
        return getattr(self, f"{kind}_kv")

    def write(self, rows: list[int], kv: torch.Tensor, kind: str) -> None:
        """Copy one kind of a prefix: `kv` [layers, 2, L, d_model] goes to rows `rows` (L of them)."""
        if kind not in KINDS:
            raise ValueError(f"unknown prefix kind {kind!r}")
        if kv.shape != (self.num_layers[kind], 2, len(rows), self.d_model):
            raise ValueError(f"{kind} prefix of shape {tuple(kv.shape)} does not fit {len(rows)} rows")
        if rows and not 0 <= min(rows) <= max(rows) < self.rows:
            raise ValueError(f"prefix rows out of range [0, {self.rows})")
        table = self.kv(kind)
        index = torch.tensor(rows, dtype=torch.long, device=table.device)
        table.index_copy_(2, index, kv.to(table.device, table.dtype))


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, -1, head_dim).transpose(1, 2)


class BartFeedForward(nn.Module):
    """fc1 -> activation -> fc2, the FFN of a BART layer (the residual and norm are the layer's)."""

    def __init__(self, config: Any, ffn_dim: int, prefix: str) -> None:
        super().__init__()
        d_model = int(config.d_model)
        self.fc1 = ColumnParallelLinear(d_model, ffn_dim, bias=True, prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(ffn_dim, d_model, bias=True, prefix=f"{prefix}.fc2")
        self.act = get_act_fn(config.activation_function)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = self.fc1(hidden)
        out, _ = self.fc2(self.act(out))
        return out


class BartEncoderSelfAttention(nn.Module):
    """Encoder self-attention over `[prefix | source]`, batched over padded items (no KV cache)."""

    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        d_model = int(config.d_model)
        self.num_heads = int(config.encoder_attention_heads)
        self.head_dim = d_model // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            d_model, self.head_dim, self.num_heads, bias=True, prefix=f"{prefix}.qkv_proj"
        )
        self.out_proj = RowParallelLinear(d_model, d_model, bias=True, prefix=f"{prefix}.out_proj")

    def forward(
        self,
        hidden: torch.Tensor,  # [B, S, d]
        prefix_k: torch.Tensor,  # [B, Le, d]
        prefix_v: torch.Tensor,  # [B, Le, d]
        mask: torch.Tensor,  # [B, 1, 1, Le + S] bool, True = may attend
    ) -> torch.Tensor:
        batch, seq, d_model = hidden.shape
        qkv, _ = self.qkv_proj(hidden.reshape(batch * seq, d_model))
        q, k, v = (t.view(batch, seq, d_model) for t in qkv.chunk(3, dim=-1))  # [B, S, d] each
        keys = _split_heads(torch.cat([prefix_k, k], dim=1), self.head_dim)  # [B, H, Le + S, D]
        values = _split_heads(torch.cat([prefix_v, v], dim=1), self.head_dim)  # [B, H, Le + S, D]
        out = F.scaled_dot_product_attention(
            _split_heads(q, self.head_dim), keys, values, attn_mask=mask, scale=self.scale
        )  # [B, H, S, D]
        out, _ = self.out_proj(out.transpose(1, 2).reshape(batch * seq, d_model))
        return out.view(batch, seq, d_model)


class BartEncoderLayer(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        d_model = int(config.d_model)
        self.self_attn = BartEncoderSelfAttention(config, prefix=f"{prefix}.self_attn")
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.mlp = BartFeedForward(config, int(config.encoder_ffn_dim), prefix=prefix)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(
        self, hidden: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden, prefix_k, prefix_v, mask))
        return self.final_layer_norm(hidden + self.mlp(hidden))


class _BartStack(nn.Module):
    """What the encoder and the decoder share: token + learned position embeddings, then a norm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        d_model = int(config.d_model)
        self.embed_scale = math.sqrt(d_model) if config.scale_embedding else 1.0
        self.embed_positions = nn.Embedding(int(config.max_position_embeddings) + POSITION_OFFSET, d_model)
        self.layernorm_embedding = nn.LayerNorm(d_model)

    def embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token_embeds [..., S, d] (unscaled), positions [S] from 0 -> hidden states [..., S, d]."""
        hidden = token_embeds * self.embed_scale + self.embed_positions(positions + POSITION_OFFSET)
        return self.layernorm_embedding(hidden)


class BartEncoder(_BartStack):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            BartEncoderLayer(config, prefix=f"{prefix}.layers.{i}") for i in range(int(config.encoder_layers))
        )

    def forward(
        self,
        embed_tokens: nn.Module,
        source_ids: list[torch.Tensor],  # per item [S_i]
        prefix_rows: list[torch.Tensor],  # per item [Le_i]
        table: torch.Tensor,  # [layers, 2, rows, d]
    ) -> list[torch.Tensor]:
        """Encode the items as one right-padded batch; returns each item's outputs [S_i, d]."""
        device = table.device
        lengths = [int(s.numel()) for s in source_ids]
        prefix_lengths = [int(r.numel()) for r in prefix_rows]
        seq, num_prefix = max(lengths), max(prefix_lengths)
        ids = torch.zeros(len(lengths), seq, dtype=torch.long, device=device)  # [B, S]
        rows = torch.zeros(len(lengths), num_prefix, dtype=torch.long, device=device)  # [B, Le]
        for b, (src, pre) in enumerate(zip(source_ids, prefix_rows, strict=True)):
            ids[b, : src.numel()] = src.view(-1)
            rows[b, : pre.numel()] = pre.view(-1)
        token_mask = torch.arange(seq, device=device) < torch.tensor(lengths, device=device)[:, None]
        prefix_mask = (
            torch.arange(num_prefix, device=device) < torch.tensor(prefix_lengths, device=device)[:, None]
        )
        mask = torch.cat([prefix_mask, token_mask], dim=1)[:, None, None, :]  # [B, 1, 1, Le + S]
        hidden = self.embed(embed_tokens(ids), torch.arange(seq, device=device))  # [B, S, d]: from 0
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, table[i, 0][rows], table[i, 1][rows], mask)  # prefix k/v [B, Le, d]
        return [hidden[b, :n] for b, n in enumerate(lengths)]


class _DecoderAttention(nn.Module):
    """What both decoder attentions share: the head layout, vLLM's attention layer, the output projection."""

    def __init__(
        self,
        config: Any,
        cache_config: CacheConfig | None,
        prefix: str,
        layer: type[Attention],
        attn_type: str,
    ) -> None:
        super().__init__()
        self.d_model = int(config.d_model)
        num_heads = int(config.decoder_attention_heads)
        head_dim = self.d_model // num_heads
        self.attn = layer(
            num_heads, head_dim, head_dim**-0.5, cache_config=cache_config, prefix=f"{prefix}.attn",
            attn_type=attn_type,
        )  # fmt: skip
        self.out_proj = RowParallelLinear(self.d_model, self.d_model, bias=True, prefix=f"{prefix}.out_proj")
        self.head_dim = head_dim
        self.num_heads = num_heads


class BartDecoderSelfAttention(_DecoderAttention):
    """Causal self-attention in vLLM's paged cache; k/v at virtual positions replaced by table rows."""

    def __init__(self, config: Any, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__(config, cache_config, prefix, Attention, AttentionType.DECODER)
        self.qkv_proj = QKVParallelLinear(
            self.d_model, self.head_dim, self.num_heads, bias=True, prefix=f"{prefix}.qkv_proj"
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [T, d]
        is_virtual: torch.Tensor,  # [T, 1] bool
        prefix_k: torch.Tensor,  # [T, d]: the row's key of each position (garbage where not virtual)
        prefix_v: torch.Tensor,  # [T, d]
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.chunk(3, dim=-1)  # [T, d] each
        out = self.attn(q, torch.where(is_virtual, prefix_k, k), torch.where(is_virtual, prefix_v, v))
        out, _ = self.out_proj(out)
        return out


class BartCrossAttention(_DecoderAttention):
    """Cross-attention over vLLM's cross cache, whose entries for the cross prefix are table rows."""

    def __init__(self, config: Any, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__(config, cache_config, prefix, CrossAttention, AttentionType.ENCODER_DECODER)
        d_model = self.d_model
        self.q_proj = ColumnParallelLinear(d_model, d_model, bias=True, prefix=f"{prefix}.q_proj")
        self.kv_proj = MergedColumnParallelLinear(
            d_model, [d_model, d_model], bias=True, prefix=f"{prefix}.kv_proj"
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [T, d]
        encoder: "EncoderStates | None",  # the joining requests' encoder outputs, this step only
        table: torch.Tensor,  # [2, rows, d]: this layer's cross prefix rows
    ) -> torch.Tensor:
        q, _ = self.q_proj(hidden)
        k = v = None
        if encoder is not None:
            kv, _ = self.kv_proj(encoder.hidden)
            k, v = kv.chunk(2, dim=-1)  # [N, d] each
            k = torch.where(encoder.is_prefix, table[0][encoder.rows], k)
            v = torch.where(encoder.is_prefix, table[1][encoder.rows], v)
        out = self.attn(q, k, v)
        out, _ = self.out_proj(out)
        return out


class EncoderStates:
    """The encoder vectors handed to the decoder this step, split from their row code."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        packed = torch.cat(outputs, dim=0)  # [N, d + 2]
        self.hidden = packed[:, :-2]  # [N, d]
        self.is_prefix, self.rows = decode_row_code(packed[:, -2:])  # [N, 1], [N]


class BartDecoderLayer(nn.Module):
    def __init__(self, config: Any, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__()
        d_model = int(config.d_model)
        self.self_attn = BartDecoderSelfAttention(config, cache_config, prefix=f"{prefix}.self_attn")
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = BartCrossAttention(config, cache_config, prefix=f"{prefix}.encoder_attn")
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.mlp = BartFeedForward(config, int(config.decoder_ffn_dim), prefix=prefix)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, d]
        is_virtual: torch.Tensor,  # [T, 1]
        self_k: torch.Tensor,  # [T, d]
        self_v: torch.Tensor,  # [T, d]
        encoder: EncoderStates | None,
        cross_table: torch.Tensor,  # [2, rows, d]
    ) -> torch.Tensor:
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden, is_virtual, self_k, self_v))
        hidden = self.encoder_attn_layer_norm(hidden + self.encoder_attn(hidden, encoder, cross_table))
        return self.final_layer_norm(hidden + self.mlp(hidden))


class BartDecoder(_BartStack):
    def __init__(self, config: Any, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            BartDecoderLayer(config, cache_config, prefix=f"{prefix}.layers.{i}")
            for i in range(int(config.decoder_layers))
        )

    def forward(
        self,
        token_embeds: torch.Tensor,  # [T, d] (virtual positions: any embedding, their k/v are replaced)
        positions: torch.Tensor,  # [T]
        is_virtual: torch.Tensor,  # [T, 1]
        rows: torch.Tensor,  # [T]: the table row of each virtual position (0 elsewhere)
        encoder: EncoderStates | None,
        table: BartPrefixTable,
    ) -> torch.Tensor:
        hidden = self.embed(token_embeds, positions)  # [T, d]
        self_table, cross_table = table.kv("decoder"), table.kv("cross")
        for i, layer in enumerate(self.layers):
            kv = self_table[i]  # [2, rows, d]
            hidden = layer(hidden, is_virtual, kv[0][rows], kv[1][rows], encoder, cross_table[i])
        return hidden


class PrefixBartModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.text_vocab_size = int(config.prefixserve_text_vocab_size)
        self.shared = VocabParallelEmbedding(
            self.text_vocab_size, int(config.d_model), prefix=f"{prefix}.shared"
        )
        self.encoder = BartEncoder(config, prefix=f"{prefix}.encoder")
        self.decoder = BartDecoder(config, vllm_config.cache_config, prefix=f"{prefix}.decoder")


@MULTIMODAL_REGISTRY.register_processor(
    PrefixBartProcessor, info=PrefixBartProcessingInfo, dummy_inputs=PrefixBartDummyInputsBuilder
)
class PrefixServeBartForConditionalGeneration(nn.Module):
    """See the module docstring. vLLM's multimodal interface (`SupportsMultiModal`) by its flags."""

    supports_multimodal = True
    supports_multimodal_embeddings = True
    supports_multimodal_raw_input_only = False
    supports_encoder_tp_data = False
    supports_mm_device_do_normalize = False
    supports_tower_connector_lora = False
    requires_raw_input_tokens = False

    # Embeddings and the LM head are tied to `model.shared`: their own copies (some checkpoints carry
    # them) are dropped.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={".fc1.": ".mlp.fc1.", ".fc2.": ".mlp.fc2.", ".embed_tokens.": None},
        orig_to_new_prefix={"lm_head.": None},
        orig_to_new_stacked={
            ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
            ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
            ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
            ".encoder_attn.k_proj": (".encoder_attn.kv_proj", 0),
            ".encoder_attn.v_proj": (".encoder_attn.kv_proj", 1),
        },
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = PrefixBartModel(vllm_config=vllm_config, prefix="model")
        self.text_vocab_size = self.model.text_vocab_size
        self.prefix_rows = int(config.prefixserve_prefix_rows)
        self.table = BartPrefixTable(config, self.prefix_rows)
        self.lm_head = ParallelLMHead(self.text_vocab_size, int(config.d_model), prefix="lm_head")
        self.lm_head = self.lm_head.tie_weights(self.model.shared)
        self.register_buffer("final_logits_bias", torch.zeros(1, self.text_vocab_size), persistent=False)
        self.logits_processor = LogitsProcessor(self.text_vocab_size)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # encoder items come as token-id prompts, never as text with a placeholder

    def get_language_model(self) -> nn.Module:
        return self.model.decoder

    def embed_input_ids(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Virtual ids embed as token 0: their hidden states only feed their own (replaced) k/v.
        return self.model.shared(torch.where(input_ids >= self.text_vocab_size, 0, input_ids))

    def embed_multimodal(self, **kwargs: Any) -> list[torch.Tensor]:
        """Run the encoder for the joining requests; per request [Lc + S, d + 2] (module docstring)."""
        sources, encoder_rows, cross_rows = (_items(kwargs[name]) for name in FIELDS)
        table = self.table.kv("encoder")
        outputs = self.model.encoder(self.model.shared, sources, encoder_rows, table)  # per item [S, d]
        packed = []
        for hidden, rows in zip(outputs, cross_rows, strict=True):
            rows = rows.view(-1).to(hidden.device)
            prefix = torch.cat(
                [hidden.new_zeros(rows.numel(), hidden.shape[1]), row_code(rows, hidden.dtype)], dim=1
            )  # [Lc, d + 2]
            tokens = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 2)], dim=1)  # [S, d + 2]
            packed.append(torch.cat([prefix, tokens], dim=0))
        return packed

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        is_virtual = (input_ids >= self.text_vocab_size).unsqueeze(-1)  # [T, 1]
        rows = (input_ids - self.text_vocab_size).clamp(0, self.prefix_rows - 1)  # [T]
        encoder = EncoderStates(encoder_outputs) if encoder_outputs else None
        return self.model.decoder(
            self.embed_input_ids(input_ids), positions, is_virtual, rows, encoder, self.table
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)  # [N, text vocab]
        if logits is None:
            return None
        logits = logits + self.final_logits_bias
        virtual = logits.new_full((logits.shape[0], self.prefix_rows), float("-inf"))  # never sampled
        return torch.cat([logits, virtual], dim=-1)  # [N, text vocab + rows]

    def write_prefix_rows(self, rows: list[int], kv: torch.Tensor, kind: str = "decoder") -> None:
        """Copy one kind of a prefix (`kv` [layers, 2, L, d_model]) into rows `rows` of the table."""
        self.table.write(rows, kv, kind)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(self._take_logits_bias(weights), mapper=self.hf_to_vllm_mapper)
        return loaded | {"final_logits_bias"}

    def _take_logits_bias(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # A non-persistent buffer (AutoWeightsLoader loads parameters): copied here.
        for name, tensor in weights:
            if name.endswith("final_logits_bias"):
                self.final_logits_bias.copy_(tensor.view(1, -1)[:, : self.text_vocab_size])
                continue
            yield name, tensor


def _items(value: torch.Tensor | list[torch.Tensor] | Mapping[str, Any]) -> list[torch.Tensor]:
    """One field of the batched encoder items as a list of 1-D tensors (vLLM stacks equal shapes)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return [torch.as_tensor(v) for v in value]

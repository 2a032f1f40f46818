# No `from __future__ import annotations` here: vLLM's `support_torch_compile` reads the forward's
# annotations as types to find the dynamic dimensions, and string annotations hide them.
"""Our prefix-tuned GPT-2 for vLLM: each task's prefix enters vLLM as virtual tokens.

A request for a task whose prefix has L positions is `[L virtual ids] + prompt ids`. A virtual id is
`text_vocab_size + row`: it names one row of `prefix_kv`, the table of prefix keys and values the
engine fills through the worker extension (`server.vllm_backend.worker`). So prompt positions start at
L, as in training and in HF PEFT. In every layer q, k, v are computed as usual, then k and v at the
virtual positions are replaced by the table's rows (`torch.where` over a mask from `input_ids`: tensor
ops only, no branch on data, so vLLM's compiled graph stays one graph) before vLLM's attention, which
writes exactly those k/v into its paged cache; later tokens attend to them through vLLM's own kernels.
The hidden states at virtual positions are never read by a real token (their k/v are replaced in every
layer), and their logits are -inf, as are the logits of every virtual id (never sampled).

The config declares the enlarged vocabulary (`vocab_size` = text vocabulary + table rows) so that vLLM
accepts the virtual ids; `prefixserve_text_vocab_size` and `prefixserve_prefix_rows` give the split
(set through `hf_overrides` by `server.vllm_backend.engine`).

Copied from vLLM 0.32's `vllm/model_executor/models/gpt2.py` (Apache-2.0, the vLLM authors; adapted
from HF transformers' GPT-2) and cut to what we serve: no pipeline or tensor parallelism beyond what
vLLM's layers do themselves, no sequence classification. Our own copy, so vLLM's refactors of its
GPT-2 do not change what we serve.
"""

from collections.abc import Iterable

import torch
from torch import nn
from transformers import GPT2Config
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors


class PrefixGPT2Attention(nn.Module):
    def __init__(
        self,
        config: GPT2Config,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.hidden_size = config.hidden_size
        total_num_heads = config.num_attention_heads
        assert total_num_heads % get_tensor_model_parallel_world_size() == 0
        self.num_heads = total_num_heads // get_tensor_model_parallel_world_size()
        self.head_dim = self.hidden_size // total_num_heads
        self.scale = self.head_dim**-0.5
        self.c_attn = QKVParallelLinear(
            self.hidden_size, self.head_dim, total_num_heads, bias=True, quant_config=quant_config,
            prefix=f"{prefix}.c_attn",
        )  # fmt: skip
        self.c_proj = RowParallelLinear(
            self.hidden_size,
            self.hidden_size,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, scale=self.scale, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
        )  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, hidden]
        is_virtual: torch.Tensor,  # [T, 1] bool: the position is a prefix position
        prefix_k: torch.Tensor,  # [T, hidden]: the table's key row of each position (garbage if not virtual)
        prefix_v: torch.Tensor,  # [T, hidden]
    ) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)  # [T, hidden] each (heads concatenated, as HF's)
        k = torch.where(is_virtual, prefix_k, k)
        v = torch.where(is_virtual, prefix_v, v)
        attn_output = self.attn(q, k, v)
        attn_output, _ = self.c_proj(attn_output)
        return attn_output


class PrefixGPT2MLP(nn.Module):
    def __init__(
        self, intermediate_size: int, config: GPT2Config, quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):  # fmt: skip
        super().__init__()
        hidden_size = config.hidden_size
        self.c_fc = ColumnParallelLinear(
            hidden_size, intermediate_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_fc"
        )
        self.c_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_proj"
        )
        self.act = get_act_fn(config.activation_function)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.c_fc(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states, _ = self.c_proj(hidden_states)
        return hidden_states


class PrefixGPT2Block(nn.Module):
    def __init__(
        self,
        config: GPT2Config,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = config.n_inner if config.n_inner is not None else 4 * hidden_size
        self.ln_1 = LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = PrefixGPT2Attention(config, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.ln_2 = LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = PrefixGPT2MLP(inner_dim, config, quant_config, prefix=f"{prefix}.mlp")

    def forward(
        self,
        hidden_states: torch.Tensor,
        is_virtual: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
    ) -> torch.Tensor:
        residual = hidden_states
        attn_output = self.attn(self.ln_1(hidden_states), is_virtual, prefix_k, prefix_v)
        hidden_states = attn_output + residual
        residual = hidden_states
        return residual + self.mlp(self.ln_2(hidden_states))


@support_torch_compile
class PrefixGPT2Model(nn.Module):
    # Drop HF's attention mask buffers; "c_attn.bias" must not be dropped.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_substr={".attn.bias": None, ".attn.masked_bias": None})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        assert not config.add_cross_attention
        assert not config.scale_attn_by_inverse_layer_idx
        assert not config.reorder_and_upcast_attn
        self.config = config
        self.text_vocab_size = int(config.prefixserve_text_vocab_size)
        self.prefix_rows = int(config.prefixserve_prefix_rows)
        self.embed_dim = config.hidden_size
        self.wte = VocabParallelEmbedding(
            self.text_vocab_size, self.embed_dim, quant_config=quant_config, prefix=f"{prefix}.wte"
        )
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.h = nn.ModuleList(
            PrefixGPT2Block(config, cache_config, quant_config, prefix=f"{prefix}.h.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.ln_f = LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        # The prefix table: [layers, 2 (key, value), rows, hidden] in the model's dtype. Written in place
        # by `write_prefix_rows` (between steps, from the worker extension), never reallocated, so the
        # compiled graph reads the current rows. Not a weight: excluded from loading and state dicts.
        self.register_buffer(
            "prefix_kv",
            torch.zeros(config.num_hidden_layers, 2, self.prefix_rows, self.embed_dim),
            persistent=False,
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Virtual ids embed as token 0: their hidden states only feed their own (replaced) k/v.
        return self.wte(torch.where(input_ids >= self.text_vocab_size, 0, input_ids))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor | IntermediateTensors:
        assert input_ids is not None, "the prefix model needs input ids (virtual tokens have no embedding)"
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        hidden_states = inputs_embeds + self.wpe(position_ids)  # [T, hidden]
        is_virtual = (input_ids >= self.text_vocab_size).unsqueeze(-1)  # [T, 1]
        rows = (input_ids - self.text_vocab_size).clamp(0, self.prefix_rows - 1)  # [T]
        for i, layer in enumerate(self.h):
            kv = self.prefix_kv[i]  # [2, rows, hidden]
            hidden_states = layer(hidden_states, is_virtual, kv[0][rows], kv[1][rows])
        return self.ln_f(hidden_states)

    def write_prefix_rows(self, rows: list[int], kv: torch.Tensor, kind: str = "decoder") -> None:
        """Copy a prefix into the table: `kv` [layers, 2, L, hidden] goes to rows `rows` (L of them)."""
        if kind != "decoder":
            raise ValueError(f"GPT-2 has decoder prefixes only, not {kind!r}")
        if kv.shape != (len(self.h), 2, len(rows), self.embed_dim):
            raise ValueError(f"prefix of shape {tuple(kv.shape)} does not fit {len(rows)} rows of this model")
        if rows and not 0 <= min(rows) <= max(rows) < self.prefix_rows:
            raise ValueError(f"prefix rows out of range [0, {self.prefix_rows})")
        index = torch.tensor(rows, dtype=torch.long, device=self.prefix_kv.device)
        self.prefix_kv.index_copy_(2, index, kv.to(self.prefix_kv.device, self.prefix_kv.dtype))

    def _transpose_conv1d(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # HF's GPT-2 uses Conv1D, whose 2-D weights are stored transposed relative to a Linear's.
        for name, loaded_weight in weights:
            if name.endswith(".weight") and any(proj in name for proj in ("c_attn", "c_proj", "c_fc")):
                loaded_weight = loaded_weight.t()
            yield name, loaded_weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(self._transpose_conv1d(weights), mapper=self.hf_to_vllm_mapper)


class PrefixServeGPT2LMHeadModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = PrefixGPT2Model(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
        )
        text_vocab = self.transformer.text_vocab_size
        self.lm_head = ParallelLMHead(
            text_vocab, config.hidden_size, quant_config=vllm_config.quant_config, prefix=f"{prefix}.lm_head"
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(text_vocab)
        self.prefix_rows = self.transformer.prefix_rows

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)  # [N, text vocab]
        if logits is None:
            return None
        virtual = logits.new_full((logits.shape[0], self.prefix_rows), float("-inf"))  # never sampled
        return torch.cat([logits, virtual], dim=-1)  # [N, text vocab + rows]

    def write_prefix_rows(self, rows: list[int], kv: torch.Tensor, kind: str = "decoder") -> None:
        self.transformer.write_prefix_rows(rows, kv, kind)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(_add_transformer_prefix(weights))


def _add_transformer_prefix(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        yield name, tensor

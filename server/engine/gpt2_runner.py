"""GPT-2 forward over the paged KV cache with shared prefixes, chunked prefill and mixed steps.

One `step` runs every token of the step through the model once: one token per decoding row plus a
chunk of prompt tokens per prefilling row, packed as `[T, E]` (no padding FLOPs in embeddings, QKV
and MLP, where nearly all the FLOPs are). Attention (see `attention.py`) is one softmax over each
row's [prefix | own tokens] scores: own tokens gathered from the head-major block pool (`paged_kv.py`
holds the layout rule), the prefix scores of every task in one batched product over the stacked
prefixes (`prefix_layout.py`: concatenated, or a per-task grid). The token at own index t has position
id L + t, so real tokens start at position L, as in PEFT.

Host/device traffic per step: every index the step needs (token ids, positions, write slots, gather
slots, lengths) is built on the host and sent in one copy (from pinned memory, non-blocking, on CUDA);
the only device->host read is the sampled ids, done by the engine. No `.item()` or `.tolist()` here.

Numerics: the per-layer functions of `modeling.gpt2` (embed, qkv, block output, LM head: the one GPT-2
forward that training and evaluation run too); this runner adds only its cache layout and attention
as softmax over [prefix | own tokens] (in float32 when the model runs in half precision), each layer
with its own `attn.scaling`. Cross-attention GPT-2 variants are refused.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from modeling import gpt2
from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.cuda_graphs import StaticDecoder, cuda_graph_capture
from server.engine.errors import PromptTooLong
from server.engine.paged_kv import PagedKVCache
from server.engine.runner import PrefillItem, decode_with_step
from server.engine.step_inputs import AttentionCall, StepInputs, paged_attention
from server.limits import DEFAULT_LIMITS


class GPT2Runner:
    """`ModelRunner` for GPT-2 family models (`GPT2LMHeadModel`)."""

    supports_chunked_prefill = True
    prefix_layout = (
        "auto"  # how attention lays out the tasks' prefixes: "auto", "concat", "grid" (prefix_layout.py)
    )

    def __init__(
        self,
        loaded: LoadedModel,
        max_rows: int,
        kv_budget_bytes: int | None = None,
        block_size: int = 16,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
        static_decode: bool | None = None,
        static_prefix_arena_tokens: int = DEFAULT_LIMITS.static_prefix_arena_tokens,
        max_cuda_graphs: int = DEFAULT_LIMITS.max_cuda_graphs,
    ) -> None:
        model = loaded.model
        config = model.config
        if config.model_type != "gpt2":
            raise ValueError(f"GPT2Runner serves gpt2 models, got model_type {config.model_type!r}")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.model = model
        self.blocks = gpt2.blocks(model)
        self.num_heads = int(config.n_head)
        self.hidden_size = int(config.n_embd)
        self.head_dim = self.hidden_size // self.num_heads
        self.max_positions = int(config.n_positions)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_id: int | None = config.eos_token_id
        self.max_rows = max_rows
        self.scales = gpt2.layer_scales(model)
        # Half precision: attention (scores, softmax, merge) in float32, as HF's upcast path and SDPA do.
        self.attention_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.fused_gelu = gpt2.tanh_gelu(model)  # one fused tanh-GELU kernel (modeling.gpt2.mlp)
        per_token = PagedKVCache.bytes_per_token(len(self.blocks), self.num_heads, self.head_dim, self.dtype)
        budget = kv_budget_bytes if kv_budget_bytes is not None else max_rows * self.max_positions * per_token
        static = self._static_path(cuda_graphs, torch_compile, static_decode)
        # The static path's arena and logits buffer are KV memory too: the pool gets what they leave.
        static_bytes = 0
        if static:
            static_bytes = StaticDecoder.buffer_bytes(
                len(self.blocks),
                self.num_heads,
                self.head_dim,
                self.dtype,
                max_rows,
                self.vocab_size,
                static_prefix_arena_tokens,
                block_size,
            )
            if budget < static_bytes + per_token * block_size:
                raise ValueError(
                    f"KV budget of {budget} bytes cannot hold the static decode path's prefix arena and "
                    f"logits ({static_bytes} bytes) and one KV block: raise PREFIXSERVE_KV_BUDGET_BYTES or "
                    f"lower PREFIXSERVE_STATIC_PREFIX_ARENA_TOKENS"
                )
        budget -= static_bytes
        self.cache = PagedKVCache(
            num_layers=len(self.blocks),
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_blocks=max(1, budget // (per_token * block_size)),
            block_size=block_size,
            dtype=self.dtype,
            device=self.device,
        )
        # request id -> prompt logits of its chunks so far ([chunk, V] each), until taken
        self._prompt_logits: dict[str, list[torch.Tensor]] = {}
        self.static_decoder: StaticDecoder | None = None
        if static:
            graphs = cuda_graphs and self.device.type == "cuda"
            self.static_decoder = StaticDecoder(
                self,
                capture=cuda_graph_capture(self.device) if graphs else None,
                torch_compile=torch_compile,
                arena_tokens=static_prefix_arena_tokens,
                max_graphs=max_cuda_graphs,
            )

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture the common decode buckets' CUDA graphs now (before any request; see `cuda_graphs`)."""
        if self.static_decoder is not None:
            self.static_decoder.warm_up()

    def _static_path(self, cuda_graphs: bool, torch_compile: bool, static_decode: bool | None) -> bool:
        """Decode-only steps take the static path (`cuda_graphs.py`) on CUDA with graphs (replayed) or
        with `torch_compile` (compiled per bucket shape); `static_decode` True/False forces it on/off."""
        graphs = cuda_graphs and self.device.type == "cuda"  # CUDA graphs exist on CUDA only
        return static_decode if static_decode is not None else graphs or torch_compile

    # ---- lengths and budget ---------------------------------------------------------------------
    def prefix_positions(self, artifact: PrefixArtifact | None) -> int:
        return 0 if artifact is None else artifact.prefix_length("decoder")

    def validate_lengths(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> None:
        prefix = self.prefix_positions(artifact)
        if prefix + num_prompt_tokens + max_new_tokens > self.max_positions:
            raise PromptTooLong(num_prompt_tokens, prefix, max_new_tokens, self.max_positions)

    def reserved_tokens(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> int:
        """Pool slots the request may hold: own tokens rounded up to blocks (its prefix is shared)."""
        return self.cache.blocks_for(num_prompt_tokens + max_new_tokens) * self.cache.block_size

    @property
    def kv_capacity_tokens(self) -> int:
        """The scheduler's KV budget: every slot of the pool."""
        return self.cache.num_blocks * self.cache.block_size

    @property
    def request_ids(self) -> list[str]:
        """Rows that finished prefill (they decode), in row order: grouped by prefix."""
        return self.grouped([r for r, row in self.cache.rows.items() if row.prefilled])

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """Pool and prefix memory: in use now, peaks since start (or the last reset), capacity."""
        if reset_peaks:
            self.cache.reset_peaks()
        static = 0 if self.static_decoder is None else self.static_decoder.nbytes
        return {
            "rows": len(self.cache.rows),
            "used_bytes": self.cache.used_bytes,
            "peak_bytes": self.cache.peak_blocks * self.cache.block_bytes,
            "capacity_bytes": self.cache.capacity_bytes,
            "prefix_bytes": self.cache.prefixes.nbytes,
            "peak_prefix_bytes": self.cache.prefixes.peak_bytes,
            "prefix_entries": len(self.cache.prefixes.keys),
            "prefix_stack_bytes": self.cache.prefixes.stacked_bytes,  # attention's stacked copies
            "static_bytes": static,  # the static path's prefix arena and logits buffer (allocated once)
            "bytes": self.cache.used_bytes + self.cache.prefixes.nbytes + static,
        }

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._prompt_logits.pop(rid, None)
            if rid in self.cache.rows:
                self.cache.remove(rid)

    def grouped(self, request_ids: list[str]) -> list[str]:
        """`request_ids` reordered so rows of one prefix are contiguous (first appearance order)."""
        return self.cache.grouped(request_ids)

    # ---- the step -------------------------------------------------------------------------------
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Prefill whole prompts (tests, benchmarks). -> logits [n, V] in `items` order."""
        ids, logits = self.step({}, items)
        index = {rid: i for i, rid in enumerate(ids)}
        return logits[[index[it.request_id] for it in items]]

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per decoding row, `token_ids: [N]` in `request_ids` order. -> logits [N, V]."""
        return decode_with_step(self, token_ids)

    @torch.inference_mode()
    def step(self, decode_tokens: dict[str, int], items: list[PrefillItem]) -> tuple[list[str], torch.Tensor]:
        """Feed one token to each decoding row and a prompt chunk to each prefilling row, in one pass.

        `items[i]` computes prompt tokens [start, end) of its request (a new row when start == 0).
        Returns (request ids, logits [n, V] float32): every decoding row, then every item whose chunk
        ends its prompt (the others have nothing to sample yet). On error, the step changes nothing.
        """
        if not (decode_tokens or items):
            return [], torch.empty(0, self.vocab_size, device=self.device)
        cache = self.cache
        new_ids: list[str] = []
        before = {rid: cache.rows[rid].length for rid in decode_tokens}
        try:
            if self.static_decoder is not None and not items:  # decode-only: bucketed, maybe a graph
                static = self.static_decoder.step(decode_tokens)
                if static is not None:
                    return static
            for it in items:
                if it.request_id not in cache.rows:
                    self._add_row(it)
                    new_ids.append(it.request_id)
                before.setdefault(it.request_id, cache.rows[it.request_id].length)
            inputs = StepInputs.build(self, decode_tokens, items)
            return inputs.sample_ids, self._forward(inputs)
        except BaseException:
            for rid, length in before.items():
                if rid in cache.rows and rid not in new_ids:
                    cache.truncate(rid, length)
            self.release(new_ids)
            raise

    def _add_row(self, item: PrefillItem) -> None:
        if not item.input_ids:
            raise ValueError("every prompt needs at least one token")
        if item.start != 0:
            raise ValueError(f"request {item.request_id!r} has no row; its first chunk must start at 0")
        kv = None if item.prefix is None else item.prefix.prefixes["decoder"]  # [layers, 2, H, L, D]
        key: Hashable | None = item.prefix_key
        if kv is not None and key is None:
            key = ("tensor", id(kv))  # the pool holds kv, so its id cannot be reused meanwhile
        self.cache.add_row(item.request_id, len(item.input_ids), key, kv)

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        E, H, D = self.hidden_size, self.num_heads, self.head_dim
        n_dec, q_max = inp.num_decode, inp.max_chunk
        adt = self.attention_dtype
        x = gpt2.embed(self.model, inp.token_ids, inp.positions)  # [T, E]
        for layer, block in enumerate(self.blocks):
            q, k, v = gpt2.qkv(block, x)  # each [T, E]
            self.cache.keys[layer].index_copy_(
                1, inp.write_slots, k.view(-1, H, D).transpose(0, 1)
            )  # [H, T, D]
            self.cache.values[layer].index_copy_(1, inp.write_slots, v.view(-1, H, D).transpose(0, 1))
            q = q.view(-1, H, D) if q.dtype == adt else q.view(-1, H, D).to(adt)  # [T, H, D]
            parts = []
            if inp.decode is not None:
                qd = q[:n_dec]  # [N, H, D]
                if inp.decode_slot_rows is not None:
                    qd = qd.index_select(0, inp.decode_slot_rows)  # [slots, H, D]
                out = self._attend(layer, qd.transpose(0, 1).unsqueeze(2), inp.decode)  # [H, slots, 1, D]
                out = out.squeeze(2).transpose(0, 1)  # [slots, H, D]
                if inp.decode_row_slots is not None:
                    out = out.index_select(0, inp.decode_row_slots)  # [N, H, D]
                parts.append(out.reshape(n_dec, E))  # [N, E]
            if inp.prefill is not None:
                slots = inp.prefill.num_slots
                grid = q.new_zeros(slots * q_max, H, D).index_copy_(0, inp.prefill_flat, q[n_dec:])
                qp = grid.view(slots, q_max, H, D).permute(2, 0, 1, 3)  # [H, slots, Q, D]
                out = self._attend(layer, qp, inp.prefill).permute(1, 2, 0, 3)  # [slots, Q, H, D]
                parts.append(out.reshape(slots * q_max, E)[inp.prefill_flat])  # [T_p, E]
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, E]
            if attn.dtype != self.dtype:
                attn = attn.to(self.dtype)
            x = gpt2.block_output(block, x, attn, self.fused_gelu)  # [T, E]
        for rid, start, end in inp.prompt_spans:  # only requests that asked pay for the full-prompt LM head
            self._prompt_logits.setdefault(rid, []).append(gpt2.lm_logits(self.model, x[start:end]).float())
        return gpt2.lm_logits(self.model, x[inp.sample_index]).float()  # [n_sample, V]

    def _attend(self, layer: int, q: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """q: [H, slots, Q, D] in the attention dtype. -> [H, slots, Q, D]."""
        return paged_attention(self.cache, layer, q, call, self.scales[layer])

    def take_prompt_logits(self, request_id: str) -> torch.Tensor | None:
        """The prompt logits `[P, V]` kept chunk by chunk for an item with `prompt_logprobs` (once)."""
        chunks = self._prompt_logits.pop(request_id, None)
        return None if chunks is None else torch.cat(chunks)

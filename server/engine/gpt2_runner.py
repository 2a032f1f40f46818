"""GPT-2 forward over the slot KV cache, reusing the HF model's modules (and so its exact weights).

gpt-fast style: plain loops over layers, K/V written into a preallocated cache, one boolean mask per
step, `scaled_dot_product_attention` over a view of the cache. Each row of the batch carries its own
task's prefix in cache indices [0, L_r) (see `kv_cache` for the layout rule); the token at cache
index i has position id i, so real tokens start at position L_r, as in PEFT.

Numerics: the same modules, in the same order, as HF's `GPT2LMHeadModel` with its default "sdpa"
attention, so logits match HF/PEFT to float rounding. Config flags are honoured:
`scale_attn_weights` / `scale_attn_by_inverse_layer_idx` through each layer's own `attn.scaling`;
`reorder_and_upcast_attn` by computing attention in float32 when the model runs in half precision.
Cross-attention GPT-2 variants are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.errors import PromptTooLong
from server.engine.kv_cache import SlotKVCache
from server.engine.runner import PrefillItem


class GPT2Runner:
    """`ModelRunner` for GPT-2 family models (`GPT2LMHeadModel`)."""

    def __init__(self, loaded: LoadedModel, max_rows: int, position_chunk: int = 256) -> None:
        model = loaded.model
        config = model.config
        if config.model_type != "gpt2":
            raise ValueError(f"GPT2Runner serves gpt2 models, got model_type {config.model_type!r}")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.wte = model.transformer.wte
        self.wpe = model.transformer.wpe
        self.blocks = list(model.transformer.h)
        self.ln_f = model.transformer.ln_f
        self.lm_head = model.lm_head
        self.num_heads = int(config.n_head)
        self.hidden_size = int(config.n_embd)
        self.head_dim = self.hidden_size // self.num_heads
        self.max_positions = int(config.n_positions)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_id: int | None = config.eos_token_id
        # Each layer's softmax scale, exactly as HF computes it (includes 1/(layer_idx+1) when set).
        self.scales = [
            float(getattr(b.attn, "scaling", self._scale(config, i))) for i, b in enumerate(self.blocks)
        ]
        self.upcast_attention = bool(config.reorder_and_upcast_attn) and self.dtype != torch.float32
        # GPT-2's "gelu_new" is the tanh approximation: one fused kernel does it (see `_mlp`).
        self.fused_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.cache = SlotKVCache(
            num_layers=len(self.blocks),
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            max_rows=max_rows,
            max_positions=self.max_positions,
            dtype=self.dtype,
            device=self.device,
            position_chunk=position_chunk,
        )
        self._row_index = torch.arange(max_rows, device=self.device)  # [max_rows]
        self._position_index = torch.arange(self.max_positions, device=self.device)  # [max_positions]
        self._prompt_logits: dict[str, torch.Tensor] = {}  # request id -> [P, V], until taken

    def _scale(self, config, layer_idx: int) -> float:  # type: ignore[no-untyped-def]
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        return scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale

    # ---- lengths ------------------------------------------------------------------------------
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
        return self.prefix_positions(artifact) + num_prompt_tokens + max_new_tokens

    @property
    def request_ids(self) -> list[str]:
        return list(self.cache.request_ids)

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._prompt_logits.pop(rid, None)
            if rid in self.cache.row_by_request_id:
                self.cache.remove(rid)

    # ---- forward ------------------------------------------------------------------------------
    def _attend(
        self, layer: int, q: torch.Tensor, rows: slice, num_keys: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """q: [N, H, Q, D] over cache rows `rows`, keys [0, num_keys); mask: [N, 1, Q, S]. -> [N, H, Q, D]."""
        keys = self.cache.keys[layer, rows, :, :num_keys]  # [N, H, S, D] view, no copy
        values = self.cache.values[layer, rows, :, :num_keys]  # [N, H, S, D]
        if self.upcast_attention:
            out = F.scaled_dot_product_attention(
                q.float(), keys.float(), values.float(), attn_mask=mask, scale=self.scales[layer]
            )
            return out.to(self.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scales[layer])

    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Append rows for `items`, write prefixes, run the right-padded prompts. -> logits [n, V] float32."""
        prefix_lens = [self.prefix_positions(it.prefix) for it in items]
        prompt_lens = [len(it.input_ids) for it in items]
        if min(prompt_lens) < 1:
            raise ValueError("every prompt needs at least one token")
        total_lens = [p + q for p, q in zip(prefix_lens, prompt_lens, strict=True)]
        rows = self.cache.add_rows([it.request_id for it in items], total_lens)
        try:
            return self._prefill(items, rows, prefix_lens, prompt_lens, max(total_lens))
        except BaseException:
            self.release([it.request_id for it in items])
            raise

    def _prefill(
        self,
        items: list[PrefillItem],
        rows: list[int],
        prefix_lens: list[int],
        prompt_lens: list[int],
        S: int,
    ) -> torch.Tensor:
        n, P, E, H, D = len(items), max(prompt_lens), self.hidden_size, self.num_heads, self.head_dim
        dev = self.device
        for row, it in zip(rows, items, strict=True):
            if it.prefix is not None:  # the only per-request copy of a prefix
                self.cache.write_prefix(row, it.prefix.prefixes["decoder"])
        # Tokens are *packed* ([T, E], no padding) for everything that works per token (embeddings, QKV,
        # MLP: nearly all the FLOPs); only attention sees the right-padded [n, P] layout. With prompts
        # of 32-128 tokens, padding every row to the longest would waste ~40% of the prefill compute.
        flat_ids = [t for it in items for t in it.input_ids]
        input_ids = torch.tensor(flat_ids, dtype=torch.long, device=dev)  # [T]
        prefix_t = torch.tensor(prefix_lens, device=dev)  # [n]
        prompt_t = torch.tensor(prompt_lens, device=dev)  # [n]
        steps = self._position_index[:P]  # [P]
        positions = prefix_t[:, None] + steps[None, :]  # [n, P] position id = cache index
        valid = steps[None, :] < prompt_t[:, None]  # [n, P] real (not padding) tokens
        # Query i of row r sees cache indices <= L_r + i (prefix + causal prompt); padded queries are
        # clamped to the last real one so no query row is fully masked (their outputs are discarded).
        last_seen = prefix_t[:, None] + torch.minimum(steps[None, :], prompt_t[:, None] - 1)  # [n, P]
        mask = (self._position_index[:S][None, None, :] <= last_seen[:, :, None])[:, None]  # [n, 1, P, S]
        flat = valid.reshape(-1).nonzero().squeeze(1)  # [T] index of each real token in the n*P grid
        write_rows = (torch.arange(n, device=dev) + rows[0]).repeat_interleave(P)[flat]  # [T]
        write_pos = positions.reshape(-1)[flat]  # [T] = each token's position id
        row_span = slice(rows[0], rows[0] + n)  # new rows are contiguous (appended)

        x = self.wte(input_ids) + self.wpe(write_pos)  # [T, E]
        for layer, block in enumerate(self.blocks):
            qkv = block.attn.c_attn(block.ln_1(x))  # [T, 3E]
            q, k, v = qkv.split(E, dim=1)  # each [T, E]
            self.cache.keys[layer][write_rows, :, write_pos] = k.view(-1, H, D)  # [T, H, D]
            self.cache.values[layer][write_rows, :, write_pos] = v.view(-1, H, D)
            q_grid = q.new_zeros(n * P, E).index_copy_(0, flat, q)  # [n*P, E] padded queries are 0
            q_grid = q_grid.view(n, P, H, D).transpose(1, 2)  # [n, H, P, D]
            attn = self._attend(layer, q_grid, row_span, S, mask)  # [n, H, P, D]
            attn = attn.transpose(1, 2).reshape(n * P, E)[flat]  # [T, E] back to packed tokens
            x = x + block.attn.c_proj(attn)  # [T, E]
            x = x + self._mlp(block, block.ln_2(x))  # [T, E]
        last = torch.cumsum(prompt_t, dim=0) - 1  # [n] each row's last real token in the packed order
        start = 0
        for it, length in zip(items, prompt_lens, strict=True):  # host ints: no sync
            if it.prompt_logprobs:  # only requests that asked pay for the full-prompt LM head
                span = x[start : start + length]  # [P, E] this prompt's packed tokens
                self._prompt_logits[it.request_id] = self.lm_head(self.ln_f(span)).float()  # [P, V]
            start += length
        return self.lm_head(self.ln_f(x[last])).float()  # [n, V]

    def _mlp(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's MLP; GPT-2's tanh GELU as one fused kernel instead of HF's five elementwise ops.

        `F.gelu(approximate="tanh")` is the same formula as HF's `NewGELUActivation` (it differs only in
        float rounding, ~1e-7); it cuts the MLP's elementwise time several-fold. Checked against PEFT/HF
        logits (1e-4) and greedy tokens in tests/engine.
        """
        if not self.fused_gelu:
            return block.mlp(x)
        return block.mlp.c_proj(F.gelu(block.mlp.c_fc(x), approximate="tanh"))

    def take_prompt_logits(self, request_id: str) -> torch.Tensor | None:
        """The prompt logits `[P, V]` kept by `prefill` for an item with `prompt_logprobs` (once)."""
        return self._prompt_logits.pop(request_id, None)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [N] for rows 0..N-1 (row order = `request_ids`). -> logits [N, V] float32."""
        n, E, H, D = self.cache.num_active, self.hidden_size, self.num_heads, self.head_dim
        if token_ids.shape != (n,):
            raise ValueError(
                f"decode expects {n} token ids (one per active row), got {tuple(token_ids.shape)}"
            )
        lengths = self.cache.lengths
        S = max(lengths) + 1
        self.cache.reserve(n, S)
        positions = torch.tensor(lengths, device=self.device)  # [N] the new token's cache index
        rows = self._row_index[:n]  # [N]
        mask = (self._position_index[:S][None, :] <= positions[:, None])[:, None, None, :]  # [N, 1, 1, S]
        x = (self.wte(token_ids.to(self.device)) + self.wpe(positions))[:, None]  # [N, 1, E]
        for layer, block in enumerate(self.blocks):
            qkv = block.attn.c_attn(block.ln_1(x))  # [N, 1, 3E]
            q, k, v = qkv.split(E, dim=2)  # each [N, 1, E]
            self.cache.keys[layer][rows, :, positions] = k.reshape(n, H, D)  # [N, H, D]
            self.cache.values[layer][rows, :, positions] = v.reshape(n, H, D)
            q = q.view(n, 1, H, D).transpose(1, 2)  # [N, H, 1, D]
            attn = self._attend(layer, q, slice(0, n), S, mask)  # [N, H, 1, D]
            x = x + block.attn.c_proj(attn.transpose(1, 2).reshape(n, 1, E))  # [N, 1, E]
            x = x + self._mlp(block, block.ln_2(x))  # [N, 1, E]
        self.cache.lengths = [length + 1 for length in lengths]
        return self.lm_head(self.ln_f(x[:, 0])).float()  # [N, V]

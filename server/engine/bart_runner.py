"""BART (encoder-decoder) forward over paged KV with shared prefixes: many tasks' three prefixes in one batch.

A request joining runs the encoder (prompts of every joining request in one padded pass, each with its
task's encoder prefix), stores the cross-attention keys/values of its encoder outputs, and feeds the
decoder start token; decoding then feeds one decoder token per row. The prompt is the *source*: the
runner wraps it as `[bos] + prompt + [eos]` (the bundled tokenizer adds no specials), and decoding
starts from `config.decoder_start_token_id`, as HF `generate` does. Every step of the decoder feeds
exactly one token to each of its rows (decoding rows and joining rows alike), so a step is one pass.

Two `PagedKVCache`s (`paged_kv.py` holds the layout rule), both with the decoder's layers and heads:

    self.cache    own tokens of row r: the decoder tokens fed so far (start token first); own token t
                  has position id Ld + t (real tokens start at Ld, the HF/PEFT rule). Its `PrefixPool`
                  holds each (task, version)'s decoder prefix [dec_layers, 2, H, Ld, D] once.
    self.cross    own tokens of row r: k_proj/v_proj of its S_r encoder outputs (source + bos/eos),
                  written once when it joins. Its `PrefixPool` holds each (task, version)'s
                  cross-attention prefix [dec_layers, 2, H, Lc, D] once.

Both pools key a row by its request id and a prefix by the request's `prefix_key` ((tenant, task,
version) from the engine), so a new version of a task is a new entry that coexists with the old one
until the old one's last row leaves. Attention is `cascade_attention` over [prefix | own tokens] for
both kinds (the call plans of `step_inputs.py`: one batched product per prefix layout for every task):
self-attention sees own tokens [0, t], cross-attention all S_r encoder tokens. Rows of one task are
kept contiguous (`PagedKVCache.grouped`) so each task's prefix is one matrix-matrix product.

The encoder keeps no state: its outputs only feed the cross pool. Its prefix (length Le_r, per row)
takes no position; source positions start at 0. Rows of one prefill are right-padded and their
encoder prefixes padded to the longest, with masks, so different tasks and lengths share one pass.

Length rules (`validate_lengths`): the encoder input `P + 2` must fit `max_positions`; the decoder
feeds the start token and all but the last generated token, so `Ld + max_new_tokens <= max_positions`.
Encoder and cross prefix lengths take no positions (they are only bounded by the artifact limits).
A request reserves its own tokens in both pools, in blocks (`reserved_tokens`); prefixes are shared.

As in the GPT-2 runner: host-side lengths and block tables (Python ints), one host-to-device copy of
every index a step needs, no `.item()` or other device reads in a step.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from modeling.bart_prefix import (
    cross_keys_values,
    decoder_embed,
    decoder_layers,
    encode,
    lm_logits,
    wrap_source,
)
from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from server.engine.errors import PromptTooLong
from server.engine.paged_kv import PagedKVCache
from server.engine.runner import PrefillItem, decode_with_step
from server.engine.step_inputs import AttentionCall, CallPlan, gather_own, paged_attention, to_device


def _too_long(
    num_prompt_tokens: int, prefix_length: int, max_new_tokens: int, limit: int, message: str
) -> PromptTooLong:
    """A `PromptTooLong` carrying the usual numbers but a message that states BART's own rule."""
    err = PromptTooLong(num_prompt_tokens, prefix_length, max_new_tokens, limit)
    err.args = (message,)
    return err


class BartRunner:
    """`ModelRunner` for BART (`BartForConditionalGeneration`) with encoder, decoder and cross prefixes."""

    supports_chunked_prefill = False  # the prompt is the encoder's input: whole prompts only
    kv_capacity_tokens = None  # the engine's config sets the KV budget (the pools never run out first)
    prefix_layout = "auto"  # how attention lays out the tasks' prefixes (prefix_layout.py)

    def __init__(
        self, loaded: LoadedModel, max_rows: int, block_size: int = 16, keep_cross_gathers: bool | None = None
    ) -> None:
        model = loaded.model
        config = model.config
        if config.model_type != "bart":
            raise ValueError(f"BartRunner serves bart models, got model_type {config.model_type!r}")
        self.model = model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.layers = list(model.get_decoder().layers)
        self.num_heads = int(config.decoder_attention_heads)
        self.hidden_size = int(config.d_model)
        self.head_dim = self.hidden_size // self.num_heads
        self.max_positions = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_id: int | None = config.eos_token_id
        self.config = config
        self.decoder_start_token_id = int(config.decoder_start_token_id)
        # Half precision: attention (scores, softmax, merge) in float32, as in the GPT-2 runner.
        self.attention_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.self_scales = [float(layer.self_attn.scaling) for layer in self.layers]
        self.cross_scales = [float(layer.encoder_attn.scaling) for layer in self.layers]

        def pool() -> PagedKVCache:
            # Each row holds at most max_positions own tokens in each pool (decoder tokens; encoder
            # input), so max_rows full rows fit: admission (the engine's budget) limits first. On CPU
            # the pool is address space until blocks are first used.
            blocks_per_row = -(-self.max_positions // block_size)
            return PagedKVCache(
                num_layers=len(self.layers),
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                num_blocks=max_rows * blocks_per_row,
                block_size=block_size,
                dtype=self.dtype,
                device=self.device,
            )

        self.cache = pool()  # decoder self-attention: own decoder tokens, decoder prefixes
        self.cross = pool()  # cross-attention: own encoder outputs' K/V, cross prefixes
        # Rows' encoder K/V never change, so their gather out of the pool ([H, slots, S, D] per layer)
        # is the same every step until a row joins or leaves: kept, it saves a copy of every row's
        # encoder K/V per layer per step (on CPU that copy cost more than the attention: bart-base,
        # 16 rows, 512 source tokens). It is a second copy of them while kept, so it is on by default
        # only off CUDA, where memory is cheap and the copy is not (`kv_stats()["cross_gather_bytes"]`).
        self.keep_cross_gathers = (
            self.device.type != "cuda" if keep_cross_gathers is None else keep_cross_gathers
        )
        self._cross_gathers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [H, slots, S, D] x 2
        self._cross_gathers_for: tuple[str, ...] | None = None  # the rows (slot order) they were built for

    # ---- lengths ------------------------------------------------------------------------------
    def prefix_positions(self, artifact: PrefixArtifact | None) -> int:
        """Decoder self-attention positions the prefix takes: the decoder prefix length."""
        return 0 if artifact is None else artifact.prefix_length("decoder")

    def validate_lengths(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> None:
        encoder_tokens = num_prompt_tokens + 2  # bos + source + eos
        if encoder_tokens > self.max_positions:
            raise _too_long(
                num_prompt_tokens,
                0,
                max_new_tokens,
                self.max_positions,
                f"prompt has {num_prompt_tokens} tokens; with <s> and </s> the encoder needs "
                f"{encoder_tokens} positions but the model's limit is {self.max_positions}",
            )
        prefix = self.prefix_positions(artifact)
        if prefix + max_new_tokens > self.max_positions:
            raise _too_long(
                num_prompt_tokens,
                prefix,
                max_new_tokens,
                self.max_positions,
                f"decoder prefix length {prefix} + max_new_tokens {max_new_tokens} = "
                f"{prefix + max_new_tokens} decoder positions, but the model's limit is {self.max_positions}",
            )

    def reserved_tokens(
        self, num_prompt_tokens: int, max_new_tokens: int, artifact: PrefixArtifact | None
    ) -> int:
        """Pool slots the request may hold: decoder tokens (start + all but the last of G) and encoder
        tokens (P + 2), each rounded up to blocks. Its prefixes are shared, so they are not counted."""
        return (
            self.cache.blocks_for(max_new_tokens) + self.cross.blocks_for(num_prompt_tokens + 2)
        ) * self.cache.block_size

    @property
    def request_ids(self) -> list[str]:
        """Active rows in row order: grouped by prefix (rows of one task contiguous)."""
        # Grouped by the task's (decoder, cross) prefix pair, so both attentions see contiguous runs.
        rank: dict[tuple[Hashable | None, Hashable | None], int] = {}
        cross = self.cross.rows
        return sorted(
            self.cache.rows,
            key=lambda r: rank.setdefault((self.cache.rows[r].prefix_key, cross[r].prefix_key), len(rank)),
        )

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """Both pools' memory (own tokens) and their prefixes': in use now, peaks, capacity."""
        pools = (self.cache, self.cross)
        if reset_peaks:
            for p in pools:
                p.reset_peaks()
        used = sum(p.used_bytes for p in pools)
        prefix = sum(p.prefixes.nbytes for p in pools)
        return {
            "rows": len(self.cache.rows),
            "used_bytes": used,
            "cross_bytes": self.cross.used_bytes,  # of used_bytes: the rows' encoder K/V
            "peak_bytes": sum(p.peak_blocks * p.block_bytes for p in pools),
            "capacity_bytes": sum(p.capacity_bytes for p in pools),
            "prefix_bytes": prefix,
            "peak_prefix_bytes": sum(p.prefixes.peak_bytes for p in pools),
            "prefix_entries": sum(len(p.prefixes.keys) for p in pools),
            "prefix_stack_bytes": sum(p.prefixes.stacked_bytes for p in pools),
            "cross_gather_bytes": sum(2 * k.numel() * k.element_size() for k, _ in self._cross_gathers),
            "bytes": used + prefix,
        }

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            for p in (self.cache, self.cross):
                if rid in p.rows:
                    p.remove(rid)
                    self._drop_cross_gathers()

    def _drop_cross_gathers(self) -> None:
        """Rows joined or left: the kept gathers are stale (a new row may even reuse a freed block)."""
        self._cross_gathers, self._cross_gathers_for = [], None

    def _cross_own(
        self, layer: int, ids: tuple[str, ...], call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s gathered encoder K/V of the rows `ids` (slot order), kept across steps."""
        if self._cross_gathers_for != ids:
            self._cross_gathers, self._cross_gathers_for = [], ids
        if len(self._cross_gathers) <= layer:  # layers run in order: built at the first step of `ids`
            self._cross_gathers.append(gather_own(self.cross, layer, call, self.attention_dtype))
        return self._cross_gathers[layer]

    # ---- forward ------------------------------------------------------------------------------
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Add rows for `items` (whole prompts, one encoder pass) -> logits [n, V] in `items` order."""
        _, logits = self.step({}, items)
        return logits

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per active row, `token_ids: [N]` in `request_ids` order. -> logits [N, V]."""
        return decode_with_step(self, token_ids)

    @torch.inference_mode()
    def step(self, decode_tokens: dict[str, int], items: list[PrefillItem]) -> tuple[list[str], torch.Tensor]:
        """Decode every running row and prefill `items` (whole prompts) in one decoder pass.

        Returns (request ids, logits [n, V] float32): the decoding rows in `request_ids` order, then
        `items` in order. On error, the step changes nothing.
        """
        order = self.request_ids if decode_tokens else []
        if set(order) != set(decode_tokens):
            raise ValueError(f"decode tokens for {sorted(decode_tokens)}, rows are {sorted(order)}")
        if any(it.start != 0 or it.end not in (None, len(it.input_ids)) for it in items):
            raise ValueError("BART prefills whole prompts (no chunked prefill)")
        if not (order or items):
            return [], torch.empty(0, self.vocab_size, device=self.device)
        new_ids = [it.request_id for it in items]
        before = {rid: self.cache.rows[rid].length for rid in order}
        try:
            if items:
                self._add_rows(items)
            ids = order + new_ids
            tokens = [decode_tokens[r] for r in order] + [self.decoder_start_token_id] * len(items)
            return ids, self._decoder_step(ids, tokens)
        except BaseException:
            for rid, length in before.items():
                self.cache.truncate(rid, length)
            self.release(new_ids)
            raise

    def _add_rows(self, items: list[PrefillItem]) -> None:
        """Rows in both pools for `items` (sharing their prefixes), and their encoder outputs' K/V."""
        for it in items:
            if it.request_id in self.cache.rows:
                raise ValueError(f"request {it.request_id!r} already has a row")
        sources = [wrap_source(it.input_ids, self.config) for it in items]  # bos + prompt + eos
        self._drop_cross_gathers()
        for it, src in zip(items, sources, strict=True):
            kinds = {} if it.prefix is None else it.prefix.prefixes
            for pool, kind, num_tokens in ((self.cache, "decoder", 1), (self.cross, "cross", len(src))):
                kv = kinds.get(kind)  # [dec_layers, 2, H, L, D] | None
                # Without the engine's key, the tensor's id (the pool holds it, so it stays unique).
                key: Hashable | None = (
                    it.prefix_key if it.prefix_key is not None or kv is None else ("tensor", id(kv))
                )
                # decoder "prompt": the start token; cross: the encoder input
                pool.add_row(it.request_id, num_tokens, key, kv)
        self._encode_into_cross_pool(items, sources)

    def _encode_into_cross_pool(self, items: list[PrefillItem], sources: list[list[int]]) -> None:
        """Run the encoder over the right-padded sources (one pass) and write each row's encoder K/V."""
        n, dev = len(items), self.device
        src_lens = [len(s) for s in sources]
        S = max(src_lens)
        padded = [s + [int(self.config.pad_token_id)] * (S - len(s)) for s in sources]
        # every row's real tokens in the padded [n, S] grid, and their pool slots, in one copy
        flat = [i * S + t for i, length in enumerate(src_lens) for t in range(length)]
        slots = [
            s
            for it, length in zip(items, src_lens, strict=True)
            for s in self.cross.append_slots(it.request_id, length)
        ]
        input_ids, src_len_t, flat_t, slots_t = to_device(
            [[t for s in padded for t in s], src_lens, flat, slots], dev
        )
        src_mask = torch.arange(S, device=dev)[None, :] < src_len_t[:, None]  # [n, S] real tokens
        enc_prefix, enc_prefix_mask = self._padded_encoder_prefix(items)  # [Le, 2, n, H, Lmax, D], [n, Lmax]
        enc_out = encode(self.model, input_ids.view(n, S), src_mask, enc_prefix, enc_prefix_mask)  # [n, S, d]
        H, D = self.num_heads, self.head_dim
        for layer, (keys, values) in enumerate(cross_keys_values(self.model, enc_out, None)):  # [n, H, S, D]
            for pool, new in ((self.cross.keys, keys), (self.cross.values, values)):
                real = new.transpose(0, 1).reshape(H, n * S, D).index_select(1, flat_t)  # [H, T, D]
                pool[layer].index_copy_(1, slots_t, real)

    def _padded_encoder_prefix(
        self, items: list[PrefillItem]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encoder prefixes padded to the longest: `[enc_layers, 2, n, H, Lmax, D]` and mask `[n, Lmax]`.

        (None, None) when no item has an encoder prefix.
        """
        lens = [_length(it.prefix, "encoder") for it in items]
        longest = max(lens)
        if longest == 0:
            return None, None
        present = [
            it.prefix.prefixes["encoder"] for it in items if it.prefix and "encoder" in it.prefix.prefixes
        ]
        layers, _, heads, _, head_dim = present[0].shape
        padded = torch.zeros(
            layers, 2, len(items), heads, longest, head_dim, dtype=self.dtype, device=self.device
        )
        for i, (it, length) in enumerate(zip(items, lens, strict=True)):
            if length:
                padded[:, :, i, :, :length] = it.prefix.prefixes["encoder"]  # type: ignore[union-attr]
        lens_t = torch.tensor(lens, device=self.device)  # [n]
        mask = torch.arange(longest, device=self.device)[None, :] < lens_t[:, None]  # [n, Lmax]
        return padded, mask

    def _decoder_step(self, ids: list[str], tokens: list[int]) -> torch.Tensor:
        """Feed one decoder token to each row of `ids` (`tokens`, same order) -> logits [n, V] float32.

        The layers are `modeling.bart_prefix`'s; this adds the paged layout: the new token's K/V go to
        its pool slot, and both attentions are `cascade_attention` over [shared prefix | own tokens].
        """
        rows, cross_rows = self.cache.rows, self.cross.rows
        positions = [rows[r].prefix_length + rows[r].length for r in ids]  # own index t -> Ld + t
        writes = [s for r in ids for s in self.cache.append_slots(r, 1)]
        lengths = [rows[r].length for r in ids]  # own tokens after this step's
        src_lens = [cross_rows[r].length for r in ids]
        plans = (
            CallPlan(self.cache, self.prefix_layout, ids, [n - 1 for n in lengths], lengths, 1),
            CallPlan(self.cross, self.prefix_layout, ids, [n - 1 for n in src_lens], src_lens, 1),
        )
        parts = [tokens, positions, writes, *plans[0].host_parts(), *plans[1].host_parts()]
        dev = to_device(parts, self.device)
        token_t, position_t, write_t = dev[:3]
        calls = [
            (pool, plan, plan.call(pool, self.attention_dtype, part), part[4], part[5])
            for pool, plan, part in zip((self.cache, self.cross), plans, (dev[3:9], dev[9:15]), strict=True)
        ]

        cross_slots = tuple(ids[r] for r in plans[1].slot_rows)  # what the cross gathers hold, in order

        def attend(layer: int, kind: int, query: torch.Tensor) -> torch.Tensor:
            # query [n, H, 1, D] -> slots [H, slots, 1, D] -> attention -> back to [n, H, 1, D]
            pool, plan, call, slot_rows, row_slots = calls[kind]
            q = query.transpose(0, 1).to(self.attention_dtype)  # [H, n, 1, D]
            if not plan.identity:
                q = q.index_select(1, slot_rows)  # [H, slots, 1, D]
            scale = (self.self_scales, self.cross_scales)[kind][layer]
            own = self._cross_own(layer, cross_slots, call) if kind == 1 and self.keep_cross_gathers else None
            out = paged_attention(pool, layer, q, call, scale, own)  # [H, slots, 1, D]
            if not plan.identity:
                out = out.index_select(1, row_slots)  # [H, n, 1, D]
            return out.transpose(0, 1).to(self.dtype)  # [n, H, 1, D]

        def self_attention(
            layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
        ) -> torch.Tensor:
            # keys, values: [n, H, 1, D] -> their pool slots (head-major [H, n, D])
            self.cache.keys[layer].index_copy_(1, write_t, keys[:, :, 0].transpose(0, 1))
            self.cache.values[layer].index_copy_(1, write_t, values[:, :, 0].transpose(0, 1))
            return attend(layer, 0, query)

        def cross_attention(layer: int, query: torch.Tensor) -> torch.Tensor:
            return attend(layer, 1, query)

        x = decoder_embed(self.model, token_t[:, None], position_t[:, None])  # [n, 1, E]
        x = decoder_layers(self.model, x, self_attention, cross_attention)  # [n, 1, E]
        return lm_logits(self.model, x[:, 0]).float()  # [n, V]


def _length(artifact: PrefixArtifact | None, kind: str) -> int:
    return 0 if artifact is None else artifact.prefix_length(kind)

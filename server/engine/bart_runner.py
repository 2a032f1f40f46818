"""BART (encoder-decoder) forward over slot caches: many tasks' three prefixes in one batch.

Per request, `prefill` runs the encoder once (with the task's encoder prefix), stores the decoder's
cross-attention keys/values for that row, writes the decoder prefix, and feeds the decoder start token.
`decode` then runs one decoder token per row. The prompt is the *source*: the runner wraps it as
`[bos] + prompt + [eos]` (the bundled tokenizer adds no specials), and decoding starts from
`config.decoder_start_token_id`, as HF `generate` does.

Two caches, both `SlotKVCache`s, kept in lockstep (same rows, same add/remove order, so the
"last row moves into the freed slot" rule moves a request's self and cross state together):

    self_cache.keys/values   [dec_layers, rows, H, self_capacity, D]
        row r: [0, Ld_r)                       the task's decoder prefix
               [Ld_r, Ld_r + T_r)              decoder tokens fed so far (start token first)
        the token at index i has position id i: decoder positions start at Ld_r (HF/PEFT rule).

    cross_cache.keys/values  [dec_layers, rows, H, cross_capacity, D]
        row r: [0, Lc_r)                       the task's cross-attention prefix
               [Lc_r, Lc_r + S_r)              k_proj/v_proj of the S_r encoder outputs (source + bos/eos)
        written once at prefill, read by every decode step; indices >= Lc_r + S_r are padding (masked).

The encoder keeps no state: its outputs only feed the cross cache. Its prefix (length Le_r, per row)
takes no position; source positions start at 0. Rows of one prefill are right-padded and their
encoder prefixes padded to the longest, with masks, so different tasks and lengths share one pass.

Length rules (`validate_lengths`): the encoder input `P + 2` must fit `max_positions`; the decoder
feeds the start token and all but the last generated token, so `Ld + max_new_tokens <= max_positions`.
Encoder and cross prefix lengths take no positions (they are only bounded by the artifact limits).

As in the GPT-2 runner: host-side lengths (Python ints), one host-to-device copy of index tensors per
step, no `.item()` or other device reads in `decode`.
"""

from __future__ import annotations

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
from server.engine.kv_cache import SlotKVCache
from server.engine.runner import PrefillItem


def _too_long(
    num_prompt_tokens: int, prefix_length: int, max_new_tokens: int, limit: int, message: str
) -> PromptTooLong:
    """A `PromptTooLong` carrying the usual numbers but a message that states BART's own rule."""
    err = PromptTooLong(num_prompt_tokens, prefix_length, max_new_tokens, limit)
    err.args = (message,)
    return err


class BartRunner:
    """`ModelRunner` for BART (`BartForConditionalGeneration`) with encoder, decoder and cross prefixes."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_rows: int,
        position_chunk: int = 256,
        *,
        max_prefix_length: int,  # the configured upload limit (`Limits`): sizes the cross cache
    ) -> None:
        model = loaded.model
        config = model.config
        if config.model_type != "bart":
            raise ValueError(f"BartRunner serves bart models, got model_type {config.model_type!r}")
        self.model = model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.num_heads = int(config.decoder_attention_heads)
        self.hidden_size = int(config.d_model)
        self.head_dim = self.hidden_size // self.num_heads
        self.max_positions = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_id: int | None = config.eos_token_id
        self.config = config
        self.decoder_start_token_id = int(config.decoder_start_token_id)

        def slot_cache(max_positions: int) -> SlotKVCache:
            return SlotKVCache(
                num_layers=len(self.layers),
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                max_rows=max_rows,
                max_positions=max_positions,
                dtype=self.dtype,
                device=self.device,
                position_chunk=position_chunk,
            )

        self.self_cache = slot_cache(self.max_positions)
        # Cross rows hold a cross prefix (up to the artifact limit) plus the whole encoder input.
        self.cross_cache = slot_cache(self.max_positions + max_prefix_length)
        self._row_index = torch.arange(max_rows, device=self.device)  # [max_rows]
        self._position_index = torch.arange(self.cross_cache.max_positions + 1, device=self.device)  # [C_max]

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
        """Self-cache positions (Ld + G) plus cross-cache positions (Lc + P + 2); equal cost per position."""
        cross = 0 if artifact is None else artifact.prefix_length("cross")
        return self.prefix_positions(artifact) + max_new_tokens + cross + num_prompt_tokens + 2

    @property
    def request_ids(self) -> list[str]:
        return list(self.self_cache.request_ids)

    def kv_stats(self, reset_peaks: bool = False) -> dict[str, int]:
        """Slot-cache occupancy (no peak tracking here: `reset_peaks` is accepted and ignored)."""
        return {
            "rows": self.self_cache.num_active,
            "row_capacity": self.self_cache.row_capacity,
            "position_capacity": self.self_cache.position_capacity,
            "cross_position_capacity": self.cross_cache.position_capacity,
            "bytes": self.self_cache.nbytes + self.cross_cache.nbytes,
        }

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self.self_cache.row_by_request_id:
                # Same remove on both caches: the same last row moves into the same slot.
                self.self_cache.remove(rid)
                self.cross_cache.remove(rid)

    # ---- forward ------------------------------------------------------------------------------
    supports_chunked_prefill = False  # the prompt is the encoder's input: whole prompts only
    kv_capacity_tokens = None  # the engine's config sets the KV budget

    def step(self, decode_tokens: dict[str, int], items: list[PrefillItem]) -> tuple[list[str], torch.Tensor]:
        """Decode every running row, then prefill `items` (whole prompts). -> (ids, logits [n, V])."""
        order = self.request_ids if decode_tokens else []
        if set(order) != set(decode_tokens):
            raise ValueError(f"decode tokens for {sorted(decode_tokens)}, rows are {sorted(order)}")
        if any(it.start != 0 or it.end not in (None, len(it.input_ids)) for it in items):
            raise ValueError("BART prefills whole prompts (no chunked prefill)")
        ids, logits = [], []
        saved_lengths = list(self.self_cache.lengths)
        if order:
            ids += order
            tokens = torch.tensor([decode_tokens[r] for r in order], device=self.device)  # [N]
            logits.append(self.decode(tokens))
        if items:
            try:
                logits.append(self.prefill(items))  # on error it releases its own (appended) rows
            except BaseException:
                self.self_cache.lengths = saved_lengths  # undo the decode: the step changes nothing
                raise
            ids += [it.request_id for it in items]
        return ids, torch.cat(logits) if len(logits) > 1 else logits[0]

    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Add rows for `items` (encoder, cross cache, decoder prefix, start token); logits [n, V] float32."""
        sources = [wrap_source(it.input_ids, self.config) for it in items]  # bos + prompt + eos
        ids = [it.request_id for it in items]
        dec_lens = [self.prefix_positions(it.prefix) for it in items]
        cross_lens = [_length(it.prefix, "cross") + len(src) for it, src in zip(items, sources, strict=True)]
        rows = self.self_cache.add_rows(ids, dec_lens)
        try:
            cross_rows = self.cross_cache.add_rows(ids, cross_lens)
            if cross_rows != rows:  # lockstep broken: a bug, never a user error
                raise RuntimeError(f"self/cross cache rows diverged: {rows} vs {cross_rows}")
            self._encode_into_cross_cache(items, sources, rows)
            for row, it in zip(rows, items, strict=True):
                if it.prefix is not None and "decoder" in it.prefix.prefixes:
                    self.self_cache.write_prefix(row, it.prefix.prefixes["decoder"])
            start = torch.full(
                (len(items),), self.decoder_start_token_id, dtype=torch.long, device=self.device
            )
            return self._decoder_step(rows[0], start)  # [n, V]
        except BaseException:
            self.release(ids)
            raise

    def _encode_into_cross_cache(
        self, items: list[PrefillItem], sources: list[list[int]], rows: list[int]
    ) -> None:
        """Run the encoder over the right-padded sources and write each row's cross prefix + encoder K/V."""
        n, H, D, dev = len(items), self.num_heads, self.head_dim, self.device
        src_lens = [len(s) for s in sources]
        S = max(src_lens)
        padded = [s + [int(self.config.pad_token_id)] * (S - len(s)) for s in sources]
        input_ids = torch.tensor(padded, dtype=torch.long, device=dev)  # [n, S]
        src_len_t = torch.tensor(src_lens, device=dev)  # [n]
        steps = self._position_index[:S]  # [S]
        src_mask = steps[None, :] < src_len_t[:, None]  # [n, S] real tokens
        enc_prefix, enc_prefix_mask = self._padded_encoder_prefix(items)  # [Le, 2, n, H, Lmax, D], [n, Lmax]
        enc_out = encode(self.model, input_ids, src_mask, enc_prefix, enc_prefix_mask)  # [n, S, d]

        cross_prefix_lens = [_length(it.prefix, "cross") for it in items]
        for row, it in zip(rows, items, strict=True):
            if cross_prefix_lens[row - rows[0]]:
                self.cross_cache.write_prefix(row, it.prefix.prefixes["cross"])  # type: ignore[union-attr]
        # Encoder K/V go right after each row's cross prefix: row r, index Lc_r + j for source token j.
        flat = src_mask.reshape(-1).nonzero().squeeze(1)  # [T] real tokens in n*S
        write_rows = (self._row_index[:n] + rows[0]).repeat_interleave(S)[flat]  # [T]
        offsets = torch.tensor(cross_prefix_lens, device=dev)  # [n]
        write_pos = (offsets[:, None] + steps[None, :]).reshape(-1)[flat]  # [T]
        cross = cross_keys_values(self.model, enc_out, None)  # per layer [n, H, S, D] x 2
        for layer, (keys, values) in enumerate(cross):
            flat_keys = keys.transpose(1, 2).reshape(n * S, H, D)[flat]  # [T, H, D]
            flat_values = values.transpose(1, 2).reshape(n * S, H, D)[flat]  # [T, H, D]
            self.cross_cache.keys[layer][write_rows, :, write_pos] = flat_keys
            self.cross_cache.values[layer][write_rows, :, write_pos] = flat_values

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
        mask = self._position_index[:longest][None, :] < lens_t[:, None]  # [n, Lmax]
        return padded, mask

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [N] for rows 0..N-1 (row order = `request_ids`). -> logits [N, V] float32."""
        n = self.self_cache.num_active
        if token_ids.shape != (n,):
            raise ValueError(
                f"decode expects {n} token ids (one per active row), got {tuple(token_ids.shape)}"
            )
        return self._decoder_step(0, token_ids.to(self.device))

    def _decoder_step(self, first_row: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one decoder token to rows [first_row, first_row + n); token_ids [n] -> logits [n, V] float32.

        The layers are `modeling.bart_prefix`'s; this adds only the slot-cache layout: the new token's
        keys/values are written at the row's length, and attention reads the row's cache up to it.
        """
        n = token_ids.shape[0]
        span = slice(first_row, first_row + n)
        lengths = self.self_cache.lengths[span]  # host ints: Ld_r + tokens fed so far
        cross_lens = self.cross_cache.lengths[span]  # host ints: Lc_r + S_r
        S = max(lengths) + 1
        C = max(cross_lens)
        self.self_cache.reserve(first_row + n, S)
        positions = torch.tensor(lengths, device=self.device)  # [n] the new token's cache index = position id
        cross_len_t = torch.tensor(cross_lens, device=self.device)  # [n]
        rows = self._row_index[span]  # [n]
        self_mask = (self._position_index[:S][None, :] <= positions[:, None])[
            :, None, None, :
        ]  # [n, 1, 1, S]
        cross_mask = (self._position_index[:C][None, :] < cross_len_t[:, None])[
            :, None, None, :
        ]  # [n, 1, 1, C]
        cross_kv = [
            (self.cross_cache.keys[layer, span, :, :C], self.cross_cache.values[layer, span, :, :C])
            for layer in range(len(self.layers))
        ]  # per layer [n, H, C, D] x 2, views

        def cached(layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # keys, values: [n, H, 1, D] -> written at each row's position; attend over [n, H, S, D] views.
            self.self_cache.keys[layer][rows, :, positions] = keys[:, :, 0]  # [n, H, D]
            self.self_cache.values[layer][rows, :, positions] = values[:, :, 0]
            return self.self_cache.keys[layer, span, :, :S], self.self_cache.values[layer, span, :, :S]

        x = decoder_embed(self.model, token_ids[:, None], positions[:, None])  # [n, 1, E]
        x = decoder_layers(self.model, x, cached, self_mask, cross_kv, cross_mask)  # [n, 1, E]
        self.self_cache.lengths[span] = [length + 1 for length in lengths]
        return lm_logits(self.model, x[:, 0]).float()  # [n, V]


def _length(artifact: PrefixArtifact | None, kind: str) -> int:
    return 0 if artifact is None else artifact.prefix_length(kind)

"""Incremental detokenization and stop conditions for one request.

Text is decoded TGI-style with two offsets into the ids (prompt + generated): `prefix_offset` marks a
few tokens of context and `read_offset` the end of what was already turned into text. A new token's
text is `decode(ids[prefix_offset:]) - decode(ids[prefix_offset:read_offset])`, and it is emitted
only when it does not end in U+FFFD, so a multi-byte UTF-8 character split over tokens is emitted
whole, once its last byte arrives.

Stop conditions, checked after every token: EOS ("eos_token", the EOS text is not included),
a stop sequence in the generated text ("stop_sequence", the text ends right before it), and
max_new_tokens ("length"). Text that could still be the beginning of a stop sequence is held back,
so the concatenation of the streamed deltas always equals the final `generated_text`.
"""

from __future__ import annotations

from typing import Any

from server.engine.types import FinishReason

CONTEXT_TOKENS = 5  # tokens of left context for decoding (byte-level BPE merges look back a little)


class IncrementalDetokenizer:
    """Turns one request's token stream into text deltas and decides when it stops.

    `ids` is the request's own list of token ids (its prompt so far), not a copy: `add_token` appends
    each generated token to it, the one place a request's tokens are recorded."""

    def __init__(
        self,
        tokenizer: Any,
        ids: list[int],
        max_new_tokens: int,
        stop: list[str],
        eos_token_id: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = ids
        self.num_prompt_tokens = len(ids)
        self.prefix_offset = max(len(self.ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.eos_token_id = eos_token_id
        self.text = ""  # all generated text decoded so far
        self.emitted = 0  # characters of `text` already returned as deltas
        self.finish_reason: FinishReason | None = None

    @property
    def num_generated(self) -> int:
        return len(self.ids) - self.num_prompt_tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode_new(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def add_token(self, token_id: int) -> str:
        """Record a new token; returns the text delta to stream (possibly ""). Sets `finish_reason`."""
        if self.eos_token_id is not None and token_id == self.eos_token_id:
            self._drain_pending()  # what is held for an incomplete character, before the EOS is added
            self.ids.append(token_id)
            self.finish_reason = "eos_token"
            return self._flush()
        self.ids.append(token_id)
        previous = len(self.text)
        self.text += self._decode_new()
        if self.stop:
            # Only a window that ends in the new text can hold a stop sequence not seen before.
            start = max(0, previous - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop_sequence"
                return self._flush()
        if self.num_generated >= self.max_new_tokens:
            self.finish_reason = "length"
            self._drain_pending()
            return self._flush()
        end = len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta

    def _drain_pending(self) -> None:
        """At the end, decode ids still held for an incomplete character (emitted as U+FFFD)."""
        if self.read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
            self.prefix_offset = self.read_offset = len(self.ids)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop sequence."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

    def finish(self, reason: FinishReason) -> str:
        """Stop for an outside reason (cancelled, error); returns any text still held back."""
        self.finish_reason = reason
        return self._flush()

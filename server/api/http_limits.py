"""`HttpLimits`: what one HTTP client may send, read once from `Settings` (issue 13).

Used by `server.main` (uvicorn's connection limits), `server.api.admission` (body limits before the
body is read) and `server.api.generation` (the prompt bound before tokenising).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.settings import Settings

# Longest token of GPT-2's byte-level BPE vocabulary, in bytes: the fallback when the tokenizer's
# vocabulary cannot be read.
GPT2_MAX_TOKEN_BYTES = 128


@dataclass(frozen=True)
class HttpLimits:
    """The limits on what one HTTP client may send, read once from `Settings` (issue 13)."""

    max_body_bytes: int  # multipart uploads
    max_json_body_bytes: int  # every other route (never above max_body_bytes)
    max_prompt_chars: int  # longer prompts cannot fit the model: 422 before tokenising
    timeout_keep_alive_s: int
    timeout_request_header_s: float
    max_connections: int
    max_request_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings, max_positions: int, tokenizer: Any = None) -> HttpLimits:
        """`max_prompt_chars` unset: the longest prompt that could still fit `max_positions` tokens."""
        max_prompt_chars = settings.max_prompt_chars or max_positions * max_token_chars(tokenizer)
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_json_body_bytes=min(settings.max_json_body_bytes, settings.max_body_bytes),
            max_prompt_chars=max_prompt_chars,
            timeout_keep_alive_s=settings.timeout_keep_alive_s,
            timeout_request_header_s=settings.timeout_request_header_s,
            max_connections=settings.max_connections,
            max_request_header_bytes=settings.max_request_header_bytes,
        )


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for, so `chars / this` bounds a prompt's token count.

    For byte-level BPE (GPT-2, BART) a vocabulary entry holds one character per byte, and a prompt's
    characters are at most its UTF-8 bytes, which its tokens split: a prompt of `c` characters has at
    least `c / max_token_chars` tokens. Tokenizers whose tokens can stand for more text than their
    vocabulary string (e.g. an unknown-word token) need `PREFIXSERVE_MAX_PROMPT_CHARS` set.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return GPT2_MAX_TOKEN_BYTES
    return max((len(token) for token in get_vocab()), default=GPT2_MAX_TOKEN_BYTES)

"""A BART request as our vLLM BART (`bart_model.py`) takes it: which table rows, which prompt.

A task's prefix takes `max(Le, Ld, Lc)` rows of the prefix table (`table_positions`); each kind is
written into the first L of them (`row_writes`: the arguments of one
`collective_rpc("prefixserve_write_rows", args=...)` per kind), and a request names them in its
prompt (`vllm_prompt`):

```
encoder prompt: [0]  + encoder item {source_ids: [bos] + prompt + [eos], encoder_prefix_rows: rows[:Le],
                                     cross_prefix_rows: rows[:Lc]}  (bart_inputs.py)
decoder prompt: [text_vocab_size + r for r in rows[:Ld]] + [decoder_start_token_id]
```

so the first generated token is sampled after the decoder start token, at position Ld, and vLLM's
`prompt_token_ids` of the request are the decoder prompt (Ld + 1 ids). The encoder's own length and the
cross prefix take no decoder position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from server.vllm_backend.bart_inputs import MODALITY, PLACEHOLDER, source_item
from server.vllm_backend.worker import encode_prefix


@dataclass(frozen=True)
class BartPrefixRows:
    """The table rows holding each kind of one request's prefix (empty: the task lacks that kind)."""

    encoder: tuple[int, ...] = ()
    decoder: tuple[int, ...] = ()
    cross: tuple[int, ...] = ()

    @classmethod
    def of(cls, rows: Sequence[int], lengths: Mapping[str, int]) -> BartPrefixRows:
        """Each kind in the first `lengths[kind]` of the `table_positions(lengths)` rows given."""
        if len(rows) < table_positions(lengths):
            raise ValueError(f"{len(rows)} rows cannot hold prefixes of lengths {dict(lengths)}")
        return cls(**{kind: tuple(rows[: lengths.get(kind, 0)]) for kind in ("encoder", "decoder", "cross")})


def table_positions(lengths: Mapping[str, int]) -> int:
    """Rows a prefix with these kind -> length takes: the kinds share rows, position by position."""
    return max(lengths.values(), default=0)


def row_writes(
    prefixes: Mapping[str, Tensor], rows: Sequence[int], dtype: torch.dtype
) -> list[tuple[list[int], bytes, str, list[int], str]]:
    """The worker calls that copy a prefix (kind -> `[layers, 2, H, L, D]`, an artifact's `prefixes`)
    into its `table_positions` rows in the serving `dtype`:
    `prefixserve_write_rows(rows[:L], data, dtype name, shape, kind)` per kind."""
    writes = []
    for kind, kv in prefixes.items():
        layers, _, _, length, _ = kv.shape
        flat = kv.permute(0, 1, 3, 2, 4).reshape(layers, 2, length, -1)  # [layers, 2, L, H*D]
        data, name, shape, _ = encode_prefix(flat, dtype)
        writes.append((list(rows[:length]), data, name, shape, kind))
    return writes


def vllm_prompt(
    encoder_ids: Sequence[int], rows: BartPrefixRows, text_vocab_size: int, decoder_start_token_id: int
) -> dict[str, Any]:
    """The encoder-decoder prompt for `AsyncLLM.generate` / `LLM.generate` (module docstring).

    `encoder_ids`: the encoder input as fed, `[bos] + prompt ids + [eos]` (`bart_prefix.wrap_source`).
    """
    item = source_item(encoder_ids, rows.encoder, rows.cross)
    return {
        "encoder_prompt": {"prompt_token_ids": [PLACEHOLDER], "multi_modal_data": {MODALITY: item}},
        "decoder_prompt": {
            "prompt_token_ids": [text_vocab_size + r for r in rows.decoder] + [decoder_start_token_id]
        },
    }

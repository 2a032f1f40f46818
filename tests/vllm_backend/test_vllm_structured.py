"""Structured output on the vLLM backend: vLLM's grammar bitmask never allows a virtual prefix id.

Our vLLM model declares the text vocabulary plus one id per prefix-table row (`core.py`'s
`hf_overrides`), and vLLM sizes its structured-output bitmask by that enlarged vocabulary. The
tokenizer has no entries there: xgrammar pads them as special tokens, which no grammar may produce.
Checked with vLLM's own xgrammar backend class, built from the running engine's config and vLLM's own
tokenizer exactly as its engine core builds it, on the grammars our compiler hands vLLM, at every step
of an answer, including a grammar that allows every text token.
"""

from __future__ import annotations

import json

import pytest
import torch

from server.engine.types import StructuredOutput
from tests.vllm_backend.conftest import TABLE_ROWS

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
    "required": ["n", "s"],
}
CASES = [
    (StructuredOutput("json", json.dumps(SCHEMA)), '{"n": 12, "s": "ab"}'),
    (StructuredOutput("json_object"), '{"a": [1, true]}'),
    (StructuredOutput("regex", r"(.|\n)*"), "anything at all\n"),
    (StructuredOutput("choice", choices=("yes", "no")), "yes"),
]


async def test_vllm_grammar_bitmask_never_allows_virtual_prefix_ids(vllm_engine, h32):
    from vllm.tokenizers import cached_tokenizer_from_config
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    config = vllm_engine.llm.vllm_config
    vocab = config.model_config.get_vocab_size()
    text_vocab = h32.spec.vocab_size
    assert vocab == text_vocab + TABLE_ROWS  # the enlarged vocabulary the bitmask is sized by
    backend = XgrammarBackend(
        config, tokenizer=cached_tokenizer_from_config(model_config=config.model_config), vocab_size=vocab
    )
    for constraint, answer in CASES:
        ebnf = (await vllm_engine.grammars.prepare("default", constraint)).ebnf  # what vLLM is given
        grammar = backend.compile_grammar(StructuredOutputOptions.GRAMMAR, ebnf)
        bitmask = backend.allocate_token_bitmask(1)  # [1, ceil(vocab / 32)]
        tokens = h32.tokenizer.encode(answer)
        for step in range(len(tokens) + 1):
            grammar.fill_bitmask(bitmask, 0)
            bits = ((bitmask[0][:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
            assert bits[:text_vocab].any(), (constraint.kind, step)
            assert not bits[text_vocab:].any(), (constraint.kind, step)  # no virtual id, ever
            if step < len(tokens):
                assert grammar.accept_tokens("r", [tokens[step]]), (constraint.kind, answer, step)

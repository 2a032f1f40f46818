"""A prefix trained with HF PEFT's seq2seq prefix tuning (decoder self-attention only), imported, gives
on our BART on vLLM exactly what PEFT gives: alone, and beside other tasks and bare requests.

PEFT 0.21.2 + transformers 5.19 (the version vLLM 0.32 pins): plain `PeftModel.generate` drops the
prefix, so PEFT's greedy tokens come from `generate(..., past_key_values=model.get_prompt(1))`, and
its logprobs from its forward (which applies the prefix); see docs/encoder-decoder.md.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from modeling import bart_prefix
from modeling.models import LoadedModel, load_model
from prefix_store.peft_format import peft_to_artifact
from tests.vllm_backend.bart.driver import BartVllm, Generated, Prefixes, assert_same, reference

pytestmark = pytest.mark.asyncio(loop_scope="session")
peft = pytest.importorskip("peft")

MAX_NEW = 10


@pytest.fixture(scope="module")
def peft_model(bart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Prefixes]:
    """A PEFT SEQ_2_SEQ_LM prefix (4 virtual tokens, large random values) and its imported artifact."""
    base = load_model(str(bart_dir), "cpu", "float32")
    model = peft.get_peft_model(
        base.model, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    weight = model.prompt_encoder["default"].embedding.weight  # [L, layers * 2 * d_model]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 3)
    out = tmp_path_factory.mktemp("peft-bart")
    model.save_pretrained(str(out))
    model.eval()
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-bart-h32"  # a fixed name: it lands in the artifact header
    artifact = peft_to_artifact(
        json.dumps(config).encode(), (out / "adapter_model.safetensors").read_bytes(), base.spec
    )
    assert set(artifact.prefixes) == {"decoder"}
    return model, artifact.prefixes


@torch.no_grad()
def peft_reference(model: Any, source_ids: list[int]) -> Generated:
    """PEFT's greedy tokens (generate with the prefix as `past_key_values=`) and their logprobs (its forward)."""
    source = torch.tensor([bart_prefix.wrap_source(source_ids, model.config)])  # [1, S]
    out = model.generate(
        input_ids=source,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        num_beams=1,
        past_key_values=model.get_prompt(1),
    )
    tokens = out[0, 1:].tolist()  # the decoder start token dropped
    target = torch.tensor([[int(model.config.decoder_start_token_id), *tokens[:-1]]])  # [1, T]
    logits = model(input_ids=source, decoder_input_ids=target).logits[0]  # [T, V]
    chosen = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    return Generated(tokens, chosen.tolist())


async def test_peft_prefix_equals_peft_alone_and_beside_other_tasks(
    bart_vllm: BartVllm,
    bart: LoadedModel,
    bart_tasks: dict[str, Prefixes | None],
    peft_model: tuple[Any, Prefixes],
) -> None:
    model, imported = peft_model
    rows = await bart_vllm.load(imported)
    sources = [
        [int(t) for t in torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(n))]
        for n in (7, 15)
    ]
    wants = [peft_reference(model, src) for src in sources]
    for src, want in zip(sources, wants, strict=True):
        got = await bart_vllm.generate(src, rows, MAX_NEW)
        # PEFT stops at EOS; vLLM here does not: the tokens up to PEFT's end must agree.
        assert_same(
            Generated(got.tokens[: len(want.tokens)], got.logprobs[: len(want.tokens)]), want, "alone"
        )

    others = {name: await bart_vllm.load(prefixes) for name, prefixes in bart_tasks.items()}
    mixed = [
        bart_vllm.generate(sources[0], rows, MAX_NEW),
        *(bart_vllm.generate(sources[1], others[name], MAX_NEW) for name in others),
        bart_vllm.generate(sources[1], rows, MAX_NEW),
    ]
    results = await asyncio.gather(*mixed)
    for got, want in ((results[0], wants[0]), (results[-1], wants[1])):
        assert_same(
            Generated(got.tokens[: len(want.tokens)], got.logprobs[: len(want.tokens)]), want, "mixed"
        )
    for got, name in zip(results[1:-1], others, strict=True):
        assert_same(got, reference(bart.model, sources[1], bart_tasks[name], MAX_NEW), f"beside PEFT: {name}")
    bare = reference(bart.model, sources[0], None, MAX_NEW)
    assert results[0].tokens != bare.tokens, "the PEFT prefix must change the output"

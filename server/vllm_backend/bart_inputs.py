"""How a BART request's encoder input reaches our vLLM model (`bart_model.py`).

vLLM v1 runs an encoder-decoder model's encoder as a multimodal encoder: a request's encoder input is
one multimodal item, processed in the front end by the model's registered processor, run through the
model's `embed_multimodal` when the request is first scheduled, and its output handed to the decoder's
cross-attention, which caches the keys/values it projects from it (one cross-attention slot per
placeholder token of the encoder prompt). This module is that processor, tokenizer-free (we tokenize;
the vLLM core starts with `skip_tokenizer_init`).

The item (modality `"text"`, the one modality vLLM's encoder-decoder scheduler allows) is a dict of
three 1-row tensors (`source_item`), passed through to the model unchanged:

- `source_ids` [1, S]: the encoder input as fed, `[bos] + prompt + [eos]`;
- `encoder_prefix_rows` [1, Le]: the prefix-table rows holding the encoder self-attention prefix;
- `cross_prefix_rows` [1, Lc]: the rows holding the cross-attention prefix.

The encoder prompt becomes `Lc + S` placeholder tokens: the cross-attention keys/values of the
request are `[Lc cross prefix entries | S projected encoder outputs]`, all visible (vLLM masks nothing
inside a request's cross-attention, and prefix entries are never masked). The encoder prefix takes
no placeholder: it lives only inside the encoder, which is our own code.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)

MODALITY = "text"
FIELDS = ("source_ids", "encoder_prefix_rows", "cross_prefix_rows")
PLACEHOLDER = 0  # the encoder prompt's token: its ids are never read, only counted


def source_item(
    source_ids: Sequence[int], encoder_rows: Sequence[int], cross_rows: Sequence[int]
) -> dict[str, torch.Tensor]:
    """One request's encoder item (see the module docstring): three [1, n] int64 tensors."""
    values = (source_ids, encoder_rows, cross_rows)
    return {
        name: torch.tensor([int(i) for i in ids], dtype=torch.long).view(1, -1)
        for name, ids in zip(FIELDS, values, strict=True)
    }


def max_prefix_length(config: Any) -> int:
    """The longest prefix the core serves (set by `core.py` through `hf_overrides`)."""
    return int(config.prefixserve_max_prefix_length)


def max_encoder_slots(config: Any) -> int:
    """Placeholder tokens of the largest encoder item: a full source plus the longest cross prefix."""
    return int(config.max_position_embeddings) + max_prefix_length(config)


def _fields_config(_data: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    return {name: MultiModalFieldConfig.batched(MODALITY) for name in FIELDS}


class SourceItems(ModalityDataItems[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]):
    """Encoder items: `FIELDS` -> [items, n] int64 tensors, passed through to the model as they are
    (vLLM's own pass-through items, `DictEmbeddingItems`, are refused unless the core accepts
    precomputed embeddings, which ours never needs)."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        if set(data) != set(FIELDS):
            raise ValueError(f"a BART encoder item has the fields {FIELDS}, got {sorted(data)}")
        counts = {t.shape[0] for t in data.values() if isinstance(t, torch.Tensor) and t.dim() == 2}
        if len(counts) != 1 or any(t.dtype != torch.long for t in data.values()):
            raise ValueError("a BART encoder item's fields are int64 tensors [items, n] of one item count")
        super().__init__(data, MODALITY)

    def get_count(self) -> int:
        return int(self.data["source_ids"].shape[0])

    def get(self, index: int) -> Mapping[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.data.items()}

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return self.data


class SourceDataParser(MultiModalDataParser):
    """Accepts only our encoder item: no media, nothing for a HF processor."""

    def _get_subparsers(self) -> Mapping[str, Any]:
        return {MODALITY: self._parse_source}

    def _parse_source(self, data: object) -> SourceItems:
        if not isinstance(data, Mapping):
            raise TypeError(f"a BART encoder item is a dict of {FIELDS}, not {type(data).__name__}")
        return SourceItems(data)


class PrefixBartProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return SourceDataParser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {MODALITY: max_encoder_slots(self.get_hf_config())}

    @property
    def skip_prompt_length_check(self) -> bool:
        # The encoder prompt is Lc + S placeholders: the cross prefix takes no position, so it may
        # exceed max_model_len (the source alone is checked by the engine against max_positions).
        return True


class PrefixBartDummyInputsBuilder(BaseDummyInputsBuilder[PrefixBartProcessingInfo]):
    """The largest encoder item, for vLLM's start-up profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> Any:
        if not mm_counts.get(MODALITY):
            return {}
        config = self.info.get_hf_config()
        longest = max_prefix_length(config)
        rows = [0] * longest
        return {MODALITY: source_item([PLACEHOLDER] * int(config.max_position_embeddings), rows, rows)}


class PrefixBartProcessor(EncDecMultiModalProcessor[PrefixBartProcessingInfo]):
    requires_tokenizer = False
    # The decoder prompt is ours in full: `[Ld virtual ids] + [decoder_start]`. vLLM would otherwise
    # put its decoder start token in front of the virtual ids.
    skip_decoder_start_token = True

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [PLACEHOLDER]

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> Any:
        # `EncDecMultiModalProcessor.apply` without the tokenizer it reaches for (our decoder prompts are
        # always token ids; vLLM keeps a separately given decoder prompt anyway).
        from vllm.inputs.engine import mm_enc_dec_input

        encoder_inputs = BaseMultiModalProcessor.apply(
            self,
            ProcessorInputs(
                self.create_encoder_prompt(inputs.prompt, inputs.mm_data_items),
                inputs.mm_data_items,
                inputs.mm_uuid_items,
                hf_processor_mm_kwargs=inputs.hf_processor_mm_kwargs,
                media_io_kwargs=inputs.media_io_kwargs,
                cache=inputs.cache,
            ),
            timing_ctx,
        )
        return mm_enc_dec_input(encoder_inputs, list(inputs.prompt))

    def _get_mm_fields_config(
        self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return _fields_config(hf_inputs)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        def slots(item_idx: int) -> list[int]:
            item = out_mm_kwargs[MODALITY][item_idx].get_data()
            sizes = (torch.as_tensor(item[name]).numel() for name in ("cross_prefix_rows", "source_ids"))
            return [PLACEHOLDER] * sum(sizes)

        return [PromptReplacement(modality=MODALITY, target=[PLACEHOLDER], replacement=slots)]

"""Request and response bodies (pydantic) of the native and TGI/LoRAX routes, and shared helpers.

Compatibility: a client written for TGI, LoRAX, vLLM or OpenAI works unchanged, so request
models declare every field those APIs define. Each field is either supported, or accepted only at
its neutral value (null/false/empty) with a 422 naming the reason otherwise (`neutral_only`). Fields
no API defines are kept aside by pydantic (`extra="allow"`): the compatibility routes ignore them
with a warning in the log, as vLLM does; the native `/v1/generate` routes refuse them (422), so a typo
in our own API is never silently dropped. Either way an unknown field is never reinterpreted.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from server.engine.types import MAX_TOP_N_TOKENS

MAX_NEW_TOKENS = 1 << 20  # a sanity bound for the schema; the real limit is the model's positions
MAX_SEED = 2**63 - 1
MAX_SEQUENCES = 8  # n / best_of: each sequence is one more engine request
# Temperatures below this sample like greedy decoding and are served as greedy (vLLM does the same):
# dividing logits by a denormal temperature overflows to inf/NaN.
GREEDY_TEMPERATURE_EPS = 1e-5
MIN_REPETITION_PENALTY = 1e-2  # below this, dividing logits overflows; HF's meaningful range is ~1-2
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)]
Penalty = Annotated[float | None, Field(None, ge=-2, le=2)]


class _Out(BaseModel):
    """A response body that leaves out its `_omit_none` fields when they are None, as TGI does
    (serde's `skip_serializing_if`), so strict clients see exactly TGI's keys."""

    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self._omit_none:
            if isinstance(data, dict) and data.get(name, 0) is None:
                del data[name]
        return data


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """Dotted names of the fields no API defines, in `model` and the models nested in it."""
    names = [f"{path}{name}" for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, BaseModel):
                where = name if index is None else f"{name}[{index}]"
                names += unknown_fields(item, f"{path}{where}.")
    return names


def valid_unicode(text: str, what: str) -> str:
    """`text` unchanged, or ValueError (422) for a lone surrogate (JSON's "\\ud800"): it has no UTF-8
    form, so no tokenizer, template or response could carry it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{what} holds a lone surrogate at character {exc.start}: not valid Unicode text"
            ) from None
    return text


def neutral_only(value: Any, neutral: tuple[Any, ...], reason: str) -> Any:
    """Accept `value` when it is one of the neutral values (the API's "off"), else refuse with `reason`."""
    if value not in neutral:
        raise ValueError(f"only {' or '.join(repr(n) for n in neutral)} is accepted: {reason}")
    return value


# --------------------------------------------------------------------------------------------------
# Structured output (the request fields; `server.api.structured` turns them into the engine's constraint)

JsonSchemaValue = dict[str, Any] | str  # a schema object, or its JSON text (vLLM accepts both)


class StructuredOutputsSpec(_Request):
    """vLLM's `structured_outputs` extra (and the shape of its older `guided_*` fields): exactly one of
    `json`, `regex`, `choice`, `grammar`, `json_object`, with JSON whitespace options."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    json_schema: JsonSchemaValue | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, description="The answer fully matches this regular expression.")
    choice: list[str] | None = Field(None, description="The answer is exactly one of these strings.")
    grammar: str | None = Field(None, description="An EBNF (GBNF) grammar, start rule `root`.")
    json_object: bool | None = Field(None, description="Any JSON object.")
    disable_any_whitespace: bool = Field(False, description="JSON without whitespace between tokens.")
    whitespace_pattern: str | None = Field(None, description="A regex each JSON whitespace place matches.")
    disable_additional_properties: bool = Field(
        False, description="Accepted: additionalProperties defaults to false already (strict mode)."
    )
    structural_tag: Any = None

    @model_validator(mode="after")
    def _neutral(self) -> StructuredOutputsSpec:
        neutral_only(self.structural_tag, (None,), "structural tags (tool-call formats) are not supported")
        return self


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = Field(None, max_length=256)
    description: str | None = None
    schema_: JsonSchemaValue | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="Accepted; schemas are always enforced exactly.")


class ResponseFormat(_Request):
    """OpenAI's `response_format` (`text`, `json_object`, `json_schema`), and LoRAX's (`json_object`
    with a `schema`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: JsonSchemaValue | None = Field(None, alias="schema", description="LoRAX: json_object's schema.")


class TgiGrammar(_Request):
    """TGI's `parameters.grammar`: `{"type": "json", "value": schema}` or `{"type": "regex", "value": ...}`."""

    type: Literal["json", "regex"]
    value: JsonSchemaValue


# --------------------------------------------------------------------------------------------------
# TGI / LoRAX / native generation


class GenerateParameters(_Request):
    """Sampling parameters: TGI's `GenerateParameters` and LoRAX's additions (names, defaults: greedy,
    20 new tokens). LoRAX's client sends `max_new_tokens: null`, which means the default."""

    max_new_tokens: int | None = Field(20, ge=1, le=MAX_NEW_TOKENS)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1, description="Typical decoding mass (1: off).")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=100)
    frequency_penalty: Penalty = Field(None, description="OpenAI semantics over generated tokens (0: off).")
    stop: StopList = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    details: bool = False
    decoder_input_details: bool = Field(False, description="details.prefill: prompt tokens with logprobs.")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS, description="details.top_tokens.")
    return_k_alternatives: int | None = Field(
        None, ge=0, le=MAX_TOP_N_TOKENS, description="LoRAX's name: token.alternative_tokens."
    )
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    best_of: int | None = Field(
        None, ge=1, le=MAX_SEQUENCES, description="Sample this many, return the most likely (sampling only)."
    )
    ignore_eos: bool = Field(False, description="Generate max_new_tokens even past EOS (vLLM extension).")
    ignore_eos_token: bool = Field(False, description="LoRAX's name for ignore_eos.")
    adapter_id: str | None = Field(None, description="The task (LoRAX/TGI style); `task` takes precedence.")
    api_token: str | None = Field(None, description="LoRAX: hub credentials; ignored (tasks are local).")
    # Structured output: at most one of these (`server.api.structured`).
    grammar: TgiGrammar | None = Field(None, description="TGI: json schema or regex constraint.")
    response_format: ResponseFormat | None = Field(None, description="LoRAX / OpenAI response format.")
    structured_outputs: StructuredOutputsSpec | None = Field(
        None, description="vLLM's structured outputs: json, regex, choice, grammar, json_object."
    )
    # Accepted only when neutral (see `_neutral`).
    adapter_source: str | None = None
    merged_adapters: Any = None
    watermark: bool = False
    num_beams: int | None = Field(None, ge=1, le=1, description="Beam search is not supported (1 only).")

    @model_validator(mode="after")
    def _neutral(self) -> GenerateParameters:
        neutral_only(
            self.adapter_source,
            (None,),
            "adapters are this server's tasks (adapter_id = task name); "
            "loading from hub, s3, local paths or pbase is not supported",
        )
        neutral_only(
            self.merged_adapters, (None,), "merging adapters is not supported (one prefix per request)"
        )
        neutral_only(self.watermark, (False,), "watermarking is not supported")
        if (self.best_of or 1) > 1:
            # TGI's and LoRAX's own rules: best_of picks among *samples*, and one seed would make them equal.
            if not self.sampling:
                raise ValueError(
                    "best_of > 1 needs sampling (do_sample, temperature, top_k, top_p or typical_p)"
                )
            if self.seed is not None:
                raise ValueError("seed must not be set when best_of > 1")
        return self

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any warper is set."""
        return self.do_sample or any(
            v is not None for v in (self.temperature, self.top_k, self.top_p, self.typical_p)
        )

    @property
    def num_alternatives(self) -> int:
        return max(self.top_n_tokens or 0, self.return_k_alternatives or 0)


class GenerateRequest(_Request):
    """`POST /v1/generate` (and TGI's `/generate`)."""

    task: str | None = Field(None, description="Task (prefix) name; null: the bare base model.")
    inputs: str = Field(min_length=1, description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))
    stream: bool = Field(False, description="Only on `POST /`: choose a stream (TGI's compat route).")

    @model_validator(mode="after")
    def _best_of_not_streamed(self) -> GenerateRequest:
        if self.stream and (self.parameters.best_of or 1) > 1:
            raise ValueError("best_of > 1 cannot be streamed (TGI's rule)")
        return self


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(_Out):
    _omit_none = ("alternative_tokens",)
    id: int
    text: str
    logprob: float | None = None
    special: bool
    alternative_tokens: list[AlternativeToken] | None = Field(
        None, description="LoRAX: return_k_alternatives."
    )


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class Details(_Out):
    _omit_none = ("top_tokens", "best_of_sequences")
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int = Field(description="Prompt tokens (LoRAX reads it).")
    generated_tokens: int
    seed: int | None = None
    prefix_version: int | None = Field(None, description="Version of the task's prefix that was used.")
    prefill: list[InputToken] = Field(default_factory=list, description="With decoder_input_details.")
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = Field(None, description="With top_n_tokens: per generated token.")
    best_of_sequences: list[BestOfSequence] | None = Field(None)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefix_version: int | None = None


class StreamResponse(_Out):
    """One SSE event of `/v1/generate_stream`; the last one carries `generated_text` and `details`."""

    _omit_none = ("top_tokens",)

    token: Token
    top_tokens: list[Token] | None = Field(None, description="With top_n_tokens.")
    generated_text: str | None = None
    details: StreamDetails | None = None


class InfoResponse(BaseModel):
    """`GET /info`: the subset of TGI's info that describes this server (`?adapter_id=`: for a task)."""

    model_id: str
    model_dtype: str
    model_device_type: str
    model_type: str
    max_total_tokens: int
    max_input_tokens: int
    max_batch_total_tokens: int | None = None
    max_concurrent_requests: int
    max_best_of: int = MAX_SEQUENCES
    max_stop_sequences: int = 16
    max_top_n_tokens: int = MAX_TOP_N_TOKENS
    router: str = "prefixserve"
    version: str


class TokenizeRequest(_Request):
    """TGI's `POST /tokenize` body (`parameters.adapter_id` is accepted and does not change the result)."""

    inputs: str = Field(max_length=1 << 20)
    parameters: GenerateParameters | None = None


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int = Field(description="Character offset of the token's text in `inputs`.")
    stop: int


# --------------------------------------------------------------------------------------------------
# Prefix management


class PrefixVersion(BaseModel):
    """One stored version of a task's prefix."""

    task: str
    version: int
    prefix_lengths: dict[str, int]
    prefix_length: int = Field(description="Decoder prefix length (positions it takes).")
    num_parameters: int
    sha256: str
    size_bytes: int
    created_at: str = Field(description="When this version was stored (ISO 8601, UTC).")
    source: str = Field("artifact", description="'artifact' or 'peft' (imported adapter).")


class PrefixDetail(PrefixVersion):
    """A task: its current version's fields plus every kept version."""

    current_version: int
    versions: list[PrefixVersion]


class PrefixPage(BaseModel):
    items: list[PrefixVersion]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


# --------------------------------------------------------------------------------------------------
# Health


class HealthResponse(BaseModel):
    status: str

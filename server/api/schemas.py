"""Request and response bodies (pydantic). Request models forbid unknown fields: a typo or an
unsupported option (beam search, best_of > 1, watermarking, grammars...) is a 422 naming the field,
never silently ignored.

TGI's `Parameters` has fields we do not implement; the `text-generation` client sends all of them on
every request (null/false), so they are declared here and accepted only at their "off" value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NEW_TOKENS = 1 << 20  # a sanity bound for the schema; the real limit is the model's positions
MAX_SEED = 2**63 - 1
# Temperatures below this sample like greedy decoding and are served as greedy (vLLM does the same):
# dividing logits by a denormal temperature overflows to inf/NaN.
GREEDY_TEMPERATURE_EPS = 1e-5
MIN_REPETITION_PENALTY = 1e-2  # below this, dividing logits overflows; HF's meaningful range is ~1-2
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------
# TGI / native generation


class GenerateParameters(_Request):
    """Sampling parameters (TGI's names and defaults: greedy, 20 new tokens)."""

    max_new_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=100)
    stop: StopList = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    details: bool = False
    return_full_text: bool = False
    ignore_eos: bool = Field(False, description="Generate max_new_tokens even past EOS (vLLM extension).")
    adapter_id: str | None = Field(None, description="The task (LoRAX/TGI style); `task` takes precedence.")
    # Accepted only when off: the text-generation client always sends them.
    num_beams: int | None = Field(None, ge=1, le=1, description="Beam search is not supported (1 only).")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    watermark: Literal[False] = False
    decoder_input_details: Literal[False] = False
    truncate: None = None
    typical_p: None = None
    top_n_tokens: None = None
    frequency_penalty: None = None
    grammar: None = None


class GenerateRequest(_Request):
    """`POST /v1/generate` (and TGI's `/generate`)."""

    task: str | None = Field(None, description="Task (prefix) name; null: the bare base model.")
    inputs: str = Field(min_length=1, description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))
    stream: bool = Field(False, description="Only on `POST /`: choose a stream (TGI's compat route).")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefix_version: int | None = Field(None, description="Version of the task's prefix that was used.")
    prefill: list[Token] = Field(default_factory=list, description="Always empty (kept for TGI clients).")
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefix_version: int | None = None


class StreamResponse(BaseModel):
    """One SSE event of `/v1/generate_stream`; the last one carries `generated_text` and `details`."""

    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class InfoResponse(BaseModel):
    """`GET /info`: the subset of TGI's info that describes this server."""

    model_id: str
    model_dtype: str
    model_device_type: str
    model_type: str
    max_total_tokens: int
    max_input_tokens: int
    max_batch_total_tokens: int | None = None
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int = 16
    router: str = "prefixserve"
    version: str


# --------------------------------------------------------------------------------------------------
# OpenAI completions


class CompletionRequest(_Request):
    """`POST /v1/completions`: `model` is a task name, or the base model's id for no prefix."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int] = Field(description="A string, a list of one string, or token ids.")
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(1.0, ge=0, le=2, description="0: greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1)
    stop: str | StopList | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    ignore_eos: bool = Field(False, description="Generate max_tokens even past EOS (vLLM extension).")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    echo: Literal[False] = False
    logprobs: None = None
    user: str | None = Field(None, max_length=256, description="Ignored.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
        elif not value:
            raise ValueError("prompt must not be empty")
        elif isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported (a list of one string)")
            if not value[0]:
                raise ValueError("prompt must not be empty")
        elif any(v < 0 for v in value):
            raise ValueError("token ids must be >= 0")
        return value


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["length", "stop"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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


class RollbackRequest(_Request):
    version: int = Field(ge=1)


# --------------------------------------------------------------------------------------------------
# Health


class HealthResponse(BaseModel):
    status: str

"""OpenAI (completions, chat) and vLLM (models, tokenize, detokenize, version) bodies.

Every field OpenAI defines is declared: supported ones are used, the rest are accepted at their
neutral value only (`neutral_only`, a 422 naming the reason otherwise). vLLM's sampling extensions
that cost nothing here (`top_k`, `repetition_penalty`, `ignore_eos`) are supported too. Fields no API
defines are ignored with a warning (see `server.api.schemas`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from server.api.schemas import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_SEQUENCES,
    MIN_REPETITION_PENALTY,
    JsonSchemaValue,
    Penalty,
    ResponseFormat,
    StopList,
    StructuredOutputsSpec,
    _Request,
    neutral_only,
    valid_unicode,
)
from server.engine.types import MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_N_TOKENS


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="A last chunk with `usage` and no choices.")
    continuous_usage_stats: bool | None = Field(None, description="vLLM: `usage` in every chunk.")


class _Sampling(_Request):
    """What completions and chat share."""

    model: str = Field(min_length=1, max_length=256, description="A task name, or the base model's id.")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0: greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(
        1, ge=1, le=MAX_SEQUENCES, description="Sequences to return (one engine request each)."
    )
    stop: str | StopList | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="With n > 1, sequence i uses seed + i.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    user: str | None = Field(None, max_length=256, description="Ignored.")
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="vLLM: -1 or 0 is off.")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=100)
    ignore_eos: bool = Field(False, description="Generate max_tokens even past EOS (vLLM extension).")
    # Structured output, at most one of these (`server.api.structured`): OpenAI's response_format,
    # vLLM's structured_outputs, and vLLM's older guided_* names that older clients still send.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsSpec | None = None
    guided_json: JsonSchemaValue | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = Field(
        None,
        max_length=64,
        description="Accepted, ignored: one grammar library (xgrammar) serves every constraint.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias!r} for {key}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Any:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


def _check_prompt(value: Any) -> Any:
    """One prompt (a string or token ids) or several (a list of strings or of token-id lists, as
    OpenAI and vLLM accept): none of them empty, token ids >= 0."""
    if not value:
        raise ValueError("prompt must not be empty")
    single = isinstance(value, str) or isinstance(value[0], int)
    for i, prompt in enumerate([value] if single else value):
        where = "prompt" if single else f"prompt[{i}]"
        if not prompt:
            raise ValueError(f"{where} must not be empty")
        if not isinstance(prompt, str) and any(t < 0 for t in prompt):
            raise ValueError(f"{where}: token ids must be >= 0")
    return value


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: `model` is a task name, or the base model's id for no prefix."""

    prompt: PromptInput = Field(
        description="A string or token ids; or several prompts (a list of strings or of token-id lists): "
        "each gets `n` choices, choice `index` = prompt index x n + i."
    )
    max_tokens: int | None = Field(
        16, ge=0, le=MAX_NEW_TOKENS, description="0 (with `echo`): score the prompt, generate nothing."
    )
    best_of: int | None = Field(
        None, ge=1, le=MAX_SEQUENCES, description="Generate this many, return the n most likely."
    )
    echo: bool | None = Field(False, description="Prepend the prompt (with its logprobs when asked).")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS, description="Top alternatives per token.")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        return _check_prompt(value)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one entry each (a string or token ids)."""
        value = self.prompt
        if isinstance(value, str) or isinstance(value[0], int):
            return [value]  # type: ignore[list-item]
        return list(value)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _rules(self) -> CompletionRequest:
        neutral_only(self.suffix, (None, ""), "insertion (suffix) is not supported by GPT-2/BART prefixes")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise ValueError("best_of must be >= n")
        if self.stream and (self.best_of or 1) > (self.n or 1):
            raise ValueError("best_of > n cannot be streamed")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (it scores the prompt and generates nothing)")
        return self


class ContentPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        neutral_only(self.type, ("text",), "messages may only hold text (no images, audio or files)")
        valid_unicode(self.text or "", "message content")
        return self


class ChatMessage(_Request):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)

    @field_validator("role", "content", "name")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return valid_unicode(value, "message") if isinstance(value, str) else value

    def template_data(self) -> dict[str, Any]:
        """The message as a chat template reads it: text parts joined into one `content` string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        data: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            data["name"] = self.name
        return data


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: messages rendered with a chat template, then a completion."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    # No effect on the output: accepted and ignored.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only when neutral.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    # vLLM's template controls
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _rules(self) -> ChatCompletionRequest:
        neutral_only(self.tools or None, (None,), "tool calling is not supported")
        neutral_only(self.functions or None, (None,), "function calling is not supported")
        neutral_only(self.tool_choice, (None, "none"), "tool calling is not supported")
        neutral_only(self.function_call, (None, "none"), "function calling is not supported")
        neutral_only(self.modalities, (None, ["text"]), "only text output")
        neutral_only(self.audio, (None,), "only text output")
        neutral_only(self.prediction, (None,), "predicted outputs are not supported")
        neutral_only(
            self.chat_template,
            (None,),
            "per-request templates are not accepted; the server's "
            "template comes from PREFIXSERVE_CHAT_TEMPLATE or the task's artifact",
        )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        return self


# --------------------------------------------------------------------------------------------------
# Responses


FinishReason = Literal["length", "stop"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Completion(BaseModel):
    """The envelope every completion-shaped response shares, in OpenAI's field order; subclasses
    narrow `object` and `choices` (a field redefined in a subclass keeps its place in the schema)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    """vLLM's model card: a task is listed like a LoRA adapter, with the base model as `parent`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int = Field(description="Positions left for prompt + output (prefix subtracted).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VllmTokenizeRequest(_Request):
    """vLLM's `POST /tokenize` body (completions form)."""

    prompt: str = Field(max_length=1 << 20)
    model: str | None = Field(None, max_length=256, description="A task: max_model_len subtracts its prefix.")
    add_special_tokens: bool = Field(True, description="GPT-2/BART's tokenizer here adds none to a prompt.")


class VllmTokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    tokens: list[int] = Field(max_length=1 << 20)
    model: str | None = Field(None, max_length=256)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str

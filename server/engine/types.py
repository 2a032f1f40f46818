"""Plain request/output types shared by the engine and its callers (no torch here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from server.engine.errors import InvalidConstraint, InvalidRequest

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled", "error"]

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01
MAX_TOP_N_TOKENS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one bias
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias entries


ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = ("json", "json_object", "regex", "choice", "grammar")
MAX_CHOICES = 1024  # alternatives of one `choice` constraint


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text (structured output, vLLM's `structured_outputs` semantics):
    JSON valid against a schema (`json`: `value` is the schema as JSON text), any JSON object
    (`json_object`), a full match of a regular expression (`regex`), exactly one of `choices`
    (`choice`), or a sentence of an EBNF grammar (`grammar`, xgrammar's dialect of GBNF, start rule
    `root`). JSON whitespace between tokens is free by default, none with `disable_any_whitespace`
    (compact separators), or matches `whitespace_pattern` (a regex) at each place it may appear.

    The engine compiles it (`server.engine.grammar`): what cannot be enforced is refused there
    (`InvalidConstraint`), never dropped."""

    kind: ConstraintKind
    value: str = ""
    choices: tuple[str, ...] = ()
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None

    @property
    def key(self) -> str:
        """The compiled grammar's cache key: every field, as one string (the schema's text as sent:
        property order is part of what xgrammar generates)."""
        return json.dumps(
            [self.kind, self.value, list(self.choices), self.disable_any_whitespace, self.whitespace_pattern]
        )

    def validate(self) -> None:
        """Raise `InvalidConstraint` for what needs no compiler to refuse."""
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidConstraint(
                f"unknown constraint kind {self.kind!r}; one of {', '.join(CONSTRAINT_KINDS)}"
            )
        if self.kind == "choice":
            if not self.choices or len(self.choices) > MAX_CHOICES:
                raise InvalidConstraint(f"choice needs 1 to {MAX_CHOICES} strings, got {len(self.choices)}")
            if not all(isinstance(c, str) for c in self.choices):
                raise InvalidConstraint("choice must be a list of strings")
        elif self.kind != "json_object" and not self.value.strip():
            raise InvalidConstraint(f"the {self.kind} constraint is empty")
        if self.whitespace_pattern is not None:
            if self.kind not in ("json", "json_object"):
                raise InvalidConstraint("whitespace_pattern applies to JSON constraints only")
            if self.disable_any_whitespace:
                raise InvalidConstraint("whitespace_pattern and disable_any_whitespace exclude each other")


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults are greedy decoding of at most 20 tokens.

    Semantics follow HF `generate` and vLLM: `logit_bias` is added first; repetition_penalty divides
    positive / multiplies negative logits of every token already in prompt + output; presence and
    frequency penalties (OpenAI's) subtract from tokens already generated; greedy rows stop there.
    With `do_sample`, temperature, top-k, top-p (nucleus) and typical-p filter the distribution.
    `seed` makes sampling reproducible per request, independent of what else is in the batch; when
    None the engine picks one and reports it in every event. `top_n_tokens` asks for that many
    alternatives per generated token, `prompt_logprobs` for the prompt tokens' log-probabilities.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    presence_penalty: float = 0.0  # 0 = off; OpenAI's range [-2, 2]
    frequency_penalty: float = 0.0  # 0 = off; OpenAI's range [-2, 2]
    typical_p: float = 1.0  # 1.0 = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_n_tokens: int = 0  # alternatives reported per generated token
    prompt_logprobs: bool = False  # report the prompt tokens' log-probabilities (first event)
    # The caller reads each sampled token's logprob (TGI's tokens, OpenAI `logprobs`, best_of's ranking).
    # False lets a backend skip computing it (vLLM then computes no log-softmax over the vocabulary);
    # the event's token_logprob may then be None.
    token_logprobs: bool = True
    seed: int | None = None
    # Keep generating past EOS until max_new_tokens (vLLM's `ignore_eos`): for benchmarks that need
    # exact output lengths, and for callers that treat EOS as an ordinary token.
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    # Structured output: the answer must match this constraint (None: free text).
    structured: StructuredOutput | None = None

    def validate(self) -> None:
        """Raise `InvalidRequest` naming the first out-of-range field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        # Below 1e-5 the scaled logits overflow float32 to inf/NaN; such temperatures mean "greedy".
        if not MIN_TEMPERATURE <= self.temperature <= 100:
            raise InvalidRequest(
                f"temperature must be in [{MIN_TEMPERATURE}, 100] (use do_sample=false for greedy), "
                f"got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 100:
            raise InvalidRequest(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 100], got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.typical_p <= 1:
            raise InvalidRequest(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        if not isinstance(self.top_n_tokens, int) or not 0 <= self.top_n_tokens <= MAX_TOP_N_TOKENS:
            raise InvalidRequest(
                f"top_n_tokens must be an integer in [0, {MAX_TOP_N_TOKENS}], got {self.top_n_tokens!r}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(
                f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries, got {len(self.logit_bias)}"
            )
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest(
                    f"logit_bias maps token ids >= 0 to values in [-100, 100], got {token!r}: {bias!r}"
                )
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_LENGTH:
                raise InvalidRequest(f"stop sequences must be 1-{MAX_STOP_LENGTH} characters, got {s!r}")
        if self.structured is not None:
            self.structured.validate()
            if self.ignore_eos:
                # A finished grammar allows only EOS; generating past it would leave the constraint.
                raise InvalidConstraint("ignore_eos cannot be combined with structured output")


@dataclass
class GenerationRequest:
    """One generation: a prompt (text or token ids) for a task's prefix (`task=None`: the bare model)."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = "default"
    task: str | None = None
    # The request's class in its tenant's fair-queue share ("interactive" | "batch"), and
    # the key that pins it to one version of a task under a traffic split (default: request_id).
    priority: str = "interactive"
    route_key: str | None = None


@dataclass
class StreamEvent:
    """One generated token. The last event of a request has `finish_reason` and the full `generated_text`.

    `text` is the decoded delta: the concatenation of all events' `text` equals `generated_text`
    (text is held back while it could still be the start of a stop sequence, and a stop sequence is
    never included).
    """

    request_id: str
    token_id: int | None  # None only on a final event that carries no token (cancelled)
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_generated_tokens: int
    seed: int
    prefix_version: int | None
    generated_text: str | None = None
    token_logprob: float | None = (
        None  # log-probability of the token under the model (before sampling filters)
    )
    # The `top_n_tokens` most likely tokens at this step as (id, logprob), most likely first.
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    # First event only, when `prompt_logprobs` was asked: the prompt's token ids and each one's
    # log-probability given those before it (None for the first).
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    # With `prompt_logprobs` and `top_n_tokens` = N > 0: for each prompt position the N most likely
    # tokens (id, logprob), most likely first; `[]` for the first position (nothing precedes it).
    prompt_top_tokens: list[list[tuple[int, float]]] | None = None
    # "current" (no traffic split), or under a split "primary" / "canary"; None: no task.
    prefix_variant: str | None = None

"""Constraints and checks shared by the structured-output tests (GPT-2 on both backends, and BART).

The models are random-weight: without the constraint their answers are word salad, so an answer that
parses and validates against its schema, fully matches its regex or is one of the choices shows the
constraint at work. The schemas are finite (enums, bounded integers and strings) so that a constrained
answer always ends (JSON whitespace runs are bounded too) before `max_tokens`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, Field


class Review(BaseModel):
    """What the openai SDK's `parse` gets: a strict json_schema built from this model."""

    label: Literal["positive", "negative", "neutral"]
    stars: int = Field(ge=1, le=5)
    tag: str = Field(max_length=6)


TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "priority": {"enum": ["low", "high"]},
        "team": {"type": "string", "maxLength": 5},
        "done": {"type": "boolean"},
    },
    "required": ["priority", "team", "done"],
}
DATE_REGEX = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
CODE_REGEX = r"[A-Z]{2}[0-9]{3}"
CHOICES = ["yes", "no", "not sure"]
# EBNF (xgrammar's dialect of GBNF): a tiny arithmetic expression.
EXPR_GRAMMAR = 'root ::= num (op num){0,2}\nnum ::= [1-9] [0-9]?\nop ::= " + " | " * "'
EXPR_REGEX = r"[1-9][0-9]?(( \+ | \* )[1-9][0-9]?){0,2}"


def check_json(text: str, schema: dict[str, Any]) -> Any:
    """The answer parsed, after validating it against `schema` (raises otherwise)."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def check_regex(text: str, pattern: str) -> str:
    assert re.fullmatch(pattern, text), (text, pattern)
    return text


def check_choice(text: str, choices: list[str]) -> str:
    assert text in choices, (text, choices)
    return text


def review_schema() -> dict[str, Any]:
    return Review.model_json_schema()


def structured_body(kind: str, **extra: Any) -> dict[str, Any]:
    """vLLM's `structured_outputs` for one of the cases above."""
    value: dict[str, Any] = {
        "json": {"json": TICKET_SCHEMA},
        "regex": {"regex": DATE_REGEX},
        "choice": {"choice": CHOICES},
        "grammar": {"grammar": EXPR_GRAMMAR},
    }[kind]
    return {**value, **extra}


def check_case(kind: str, text: str) -> Any:
    """`text` checked against the case `structured_body(kind)` asked for."""
    if kind == "json":
        return check_json(text, TICKET_SCHEMA)
    if kind == "regex":
        return check_regex(text, DATE_REGEX)
    if kind == "choice":
        return check_choice(text, CHOICES)
    return check_regex(text, EXPR_REGEX)

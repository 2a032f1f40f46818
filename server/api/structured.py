"""Structured output as the request fields say it: OpenAI's `response_format`, vLLM's
`structured_outputs` (and its older `guided_*` fields), TGI's `parameters.grammar`, LoRAX's
`parameters.response_format`, all turned into the engine's one `StructuredOutput`.

Upstream semantics: OpenAI `{"type": "json_schema", "json_schema": {"schema", "strict", ...}}` is the
schema (enforced exactly whatever `strict` says, as vLLM's xgrammar backend does), `json_object` any
JSON object, `text` no constraint; LoRAX `{"type": "json_object", "schema": ...}` the schema; TGI
`{"type": "json" | "regex", "value": ...}`; vLLM's five kinds with `disable_any_whitespace` and
`whitespace_pattern`. A request that sends two constraints (two fields, or two kinds in one
`structured_outputs`) is refused (`InvalidConstraint`: 400), never resolved by picking one; what the
grammar library cannot enforce is refused when the engine compiles it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from server.api.schemas import JsonSchemaValue, ResponseFormat, StructuredOutputsSpec, TgiGrammar
from server.engine.errors import InvalidConstraint
from server.engine.types import StructuredOutput

Named = tuple[str, StructuredOutput | None]


def _schema_text(schema: JsonSchemaValue | None, where: str) -> str:
    if schema is None:
        raise InvalidConstraint(f"{where} needs a schema")
    # A schema object is sent on as JSON text in its own key order (the order xgrammar generates in).
    return schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)


def from_response_format(
    fmt: ResponseFormat | None, field: str = "response_format"
) -> StructuredOutput | None:
    """OpenAI's (and LoRAX's) `response_format`; None for `text`."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidConstraint(f"{field}: type json_schema needs `json_schema` with a `schema`")
        return StructuredOutput("json", _schema_text(fmt.json_schema.schema_, f"{field}.json_schema"))
    if fmt.schema_ is not None:  # LoRAX: json_object with a schema
        return StructuredOutput("json", _schema_text(fmt.schema_, field))
    return StructuredOutput("json_object")


def from_structured_outputs(spec: StructuredOutputsSpec | None, field: str) -> StructuredOutput | None:
    """vLLM's `structured_outputs` (exactly one kind in it)."""
    if spec is None:
        return None
    kinds = [
        (name, value)
        for name, value in (
            ("json", spec.json_schema),
            ("regex", spec.regex),
            ("choice", spec.choice),
            ("grammar", spec.grammar),
            ("json_object", spec.json_object),
        )
        if value is not None
    ]
    if len(kinds) != 1:
        names = ", ".join(f"{field}.{name}" for name, _ in kinds) or "none"
        raise InvalidConstraint(
            f"{field} needs exactly one of json, regex, choice, grammar, json_object; got {names}"
        )
    kind, value = kinds[0]
    make = functools.partial(
        StructuredOutput,
        disable_any_whitespace=spec.disable_any_whitespace,
        whitespace_pattern=spec.whitespace_pattern,
    )
    if kind == "json":
        return make("json", _schema_text(spec.json_schema, f"{field}.json"))
    if kind == "json_object":
        if value is not True:
            raise InvalidConstraint(f"{field}.json_object must be true if set (omit it for no constraint)")
        return make("json_object")
    if kind == "choice":
        return make("choice", choices=tuple(spec.choice or ()))
    return make("regex" if kind == "regex" else "grammar", str(value))


def from_guided(body: Any) -> StructuredOutput | None:
    """vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (with
    `guided_whitespace_pattern`), as the `structured_outputs` they became."""
    fields = {
        "json": body.guided_json,
        "regex": body.guided_regex,
        "choice": body.guided_choice,
        "grammar": body.guided_grammar,
    }
    given = {name: value for name, value in fields.items() if value is not None}
    if not given:
        if body.guided_whitespace_pattern is not None:
            raise InvalidConstraint("guided_whitespace_pattern needs guided_json")
        return None
    if len(given) > 1:
        names = " and ".join(f"guided_{name}" for name in given)
        raise InvalidConstraint(f"two constraints at once: {names}; send one")
    spec = StructuredOutputsSpec.model_validate(
        {**given, "whitespace_pattern": body.guided_whitespace_pattern}
    )
    return from_structured_outputs(spec, f"guided_{next(iter(given))}")


def from_tgi_grammar(grammar: TgiGrammar | None) -> StructuredOutput | None:
    if grammar is None:
        return None
    if grammar.type == "json":
        return StructuredOutput("json", _schema_text(grammar.value, "grammar"))
    if not isinstance(grammar.value, str):
        raise InvalidConstraint("grammar: a regex grammar's value is a string")
    return StructuredOutput("regex", grammar.value)


def one_constraint(*named: Named) -> StructuredOutput | None:
    """The request's constraint: the one field that gives one, None if none; two are refused."""
    given = [(name, constraint) for name, constraint in named if constraint is not None]
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise InvalidConstraint(f"two constraints at once: {names}; send one")
    return given[0][1] if given else None


def openai_constraint(body: Any) -> StructuredOutput | None:
    """The constraint of an OpenAI completions or chat body (`_Sampling`)."""
    return one_constraint(
        ("response_format", from_response_format(body.response_format)),
        ("structured_outputs", from_structured_outputs(body.structured_outputs, "structured_outputs")),
        ("guided_*", from_guided(body)),
    )


def tgi_constraint(parameters: Any) -> StructuredOutput | None:
    """The constraint of TGI / LoRAX / native `parameters` (`GenerateParameters`)."""
    return one_constraint(
        ("parameters.grammar", from_tgi_grammar(parameters.grammar)),
        ("parameters.response_format", from_response_format(parameters.response_format, "response_format")),
        (
            "parameters.structured_outputs",
            from_structured_outputs(parameters.structured_outputs, "structured_outputs"),
        ),
    )

"""Which JSON Schema keywords our grammar library (xgrammar 0.2.8) enforces, and a check that refuses
the ones it would silently ignore.

xgrammar turns a schema into a grammar; a keyword it does not implement is dropped without a word
(`not`, `if`, `uniqueItems`, `maxProperties`, unknown `format`s, a `$ref` to another document...), so
the answer could violate the schema the caller asked for. A constraint we cannot honour is refused,
never dropped: `unsupported_keyword(schema)` names the first such keyword and where it is. Found by
compiling each keyword with and without it (an unchanged grammar means ignored); annotations
(`title`, `description`, `default`, `examples`, ...) and keywords no vocabulary defines stay allowed,
as JSON Schema says unknown keywords are.

Pure Python, no imports beyond the standard library: it runs in the compile worker, before xgrammar.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Keywords xgrammar does not enforce at all (its converter never reads them).
IGNORED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "contains",
        "minContains",
        "maxContains",
        "maxProperties",
        "propertyNames",
        "additionalItems",
        "contentSchema",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
    }
)
# String formats xgrammar generates a grammar for; any other format would be a plain string.
FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
# Where subschemas sit: keyword -> "one" (a schema), "map" (name -> schema), "list" (schemas).
_SUBSCHEMAS = {
    "properties": "map",
    "patternProperties": "map",
    "$defs": "map",
    "definitions": "map",
    "additionalProperties": "one",
    "items": "one",
    "prefixItems": "list",
    "allOf": "list",
    "anyOf": "list",
    "oneOf": "list",
}


def _children(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    for keyword, shape in _SUBSCHEMAS.items():
        value = schema.get(keyword)
        if shape == "one" and isinstance(value, dict):
            yield value, f"{path}/{keyword}"
        elif shape == "map" and isinstance(value, dict):
            for name, sub in value.items():
                yield sub, f"{path}/{keyword}/{name}"
        elif shape == "list" and isinstance(value, list):
            for i, sub in enumerate(value):
                yield sub, f"{path}/{keyword}/{i}"


def _problem(schema: dict[str, Any]) -> str | None:
    """What in this schema object (not its subschemas) xgrammar would not enforce."""
    for keyword in schema:
        if keyword in IGNORED:
            return f"keyword {keyword!r} is not supported"
    if schema.get("uniqueItems") is True:
        return "keyword 'uniqueItems' is not supported"
    for keyword in ("unevaluatedProperties", "unevaluatedItems"):
        if isinstance(schema.get(keyword), dict):
            return f"keyword {keyword!r} is supported only as true or false"
    if isinstance(schema.get("items"), list):
        return "keyword 'items' as a list (draft 7 tuples) is not supported; use 'prefixItems'"
    fmt = schema.get("format")
    if fmt is not None and fmt not in FORMATS:
        return f"format {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})"
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    shaped = [k for k in ("pattern", "format") if k in schema]
    if lengths and shaped:
        return f"{lengths[0]!r} together with {shaped[0]!r} is not supported"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"'$ref' {ref!r} points outside the schema; only local references ('#/...') are supported"
    return None


def unsupported_keyword(schema: Any, max_nodes: int = 100_000) -> str | None:
    """The first keyword of `schema` (a parsed JSON Schema) xgrammar would not enforce, with its JSON
    pointer, or None. Walks at most `max_nodes` schema objects (iteratively: no recursion limit)."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    seen = 0
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        seen += 1
        if seen > max_nodes:
            return f"the schema has more than {max_nodes} subschemas"
        problem = _problem(node)
        if problem is not None:
            return f"{problem} (at '{path or '/'}')"
        stack.extend(reversed(list(_children(node, path))))
    return None

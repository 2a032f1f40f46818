"""One grammar compile worker: `python -m server.engine.grammar_worker MEMORY_BYTES`.

A structured-output constraint is input a tenant wrote, and compiling it costs what the tenant chose:
a JSON schema with a 30,000-value enum takes many seconds and more than 512 MB against GPT-2's
vocabulary, and xgrammar's compiler cannot be interrupted. The server therefore never compiles in its own process: `server.engine.grammar`
keeps a few of these workers (`worker_pool`: deadline, memory cap, lower priority, a tenant's share).

A request is a `StructuredOutput` as a dict (and `masks`: whether the compiled grammar is wanted); the
answer is `{"ebnf", "compiled", "bytes", "seconds"}`: the constraint as one EBNF grammar (what vLLM
gets, so both backends enforce the same grammar), the grammar compiled for the tokenizer (xgrammar's
serialized `CompiledGrammar`: the native engine's token masks; compiled either way, so the bounds hold
for vLLM's own compile too) and its size; or `{"error", "reason"}` with reason "invalid" (the message
says what is wrong) or "memory". The first frame is `{"tokenizer_info": ...}` (xgrammar's serialized `TokenizerInfo`).

JSON: the schema is checked against its JSON Schema meta-schema (`jsonschema`), then for keywords
xgrammar would ignore (`json_schema_support`), then converted with xgrammar's strict mode (as vLLM
does: `additionalProperties` defaults to false). Whitespace between JSON tokens is any JSON whitespace,
at most `MAX_JSON_WHITESPACE` characters in a row: vLLM allows unbounded runs, where a model can loop
on newlines until max_tokens cuts the answer (a known failure of constrained decoding); the bound keeps
every answer of a finite schema finite and still lets pretty-printed JSON through. `whitespace_pattern`
replaces each of the grammar's whitespace places (found by their rule body; a grammar without any is
refused, never served loose).

Two fixes to xgrammar 0.2.8's JSON grammars (`_fix_json`), so that every answer is JSON: a string with
`minLength`/`maxLength` takes any character but quote, backslash and newlines, raw control characters
included, which JSON forbids (a random model wrote "tro\x07" inside one); compact JSON
(`disable_any_whitespace`) still puts ", " between array items and extra properties (xgrammar issue
945, noted in vLLM). The grammar is patched as text and parsed again, which is also what vLLM gets.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from server.engine.json_schema_support import unsupported_keyword
from server.engine.worker_pool import run_worker

# xgrammar's errors start with "[hh:mm:ss] /path/to/file.cc:123: "; the caller needs the rest.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# A whitespace place of xgrammar's JSON grammar with `max_whitespace_cnt=1`: one optional JSON space.
_WHITESPACE_BODY = '("" | ([ \\n\\r\\t]))'
# Rule names and the quoted literals / character classes they must not be confused with.
_EBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z_][A-Za-z0-9_]*')
_WHITESPACE_RULE = "whitespace_pattern"
# xgrammar's character class of length-bounded JSON strings, and the one its plain strings use.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"
_COMPACT_RULES = ("basic_array_items ::= ", "basic_object_properties ::= ")
MAX_JSON_WHITESPACE = 8  # whitespace characters in a row between JSON tokens: a newline, 7 spaces of indent

_compiler: Any = None


class ConstraintError(ValueError):
    """The constraint cannot be served; the message says why."""


def _json_grammar(request: dict[str, Any]) -> Any:
    import xgrammar as xgr

    if request["kind"] == "json_object":
        schema: Any = {"type": "object"}
    else:
        try:
            schema = json.loads(request["value"])
        except ValueError as exc:
            raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object")
        _check_schema(schema)
    compact = bool(request["disable_any_whitespace"])
    pattern = request.get("whitespace_pattern")
    grammar = xgr.Grammar.from_json_schema(
        json.dumps(schema),
        any_whitespace=not compact,
        separators=(",", ":") if compact else None,
        strict_mode=True,
        max_whitespace_cnt=1 if pattern is not None else MAX_JSON_WHITESPACE,
    )
    ebnf = _fix_json(str(grammar), compact)
    return xgr.Grammar.from_ebnf(ebnf) if pattern is None else _with_whitespace(ebnf, pattern)


def _fix_json(ebnf: str, compact: bool) -> str:
    """xgrammar's JSON grammar without its two known ways to leave JSON (see the module docstring)."""
    lines = []
    for line in ebnf.splitlines():
        line = line.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
        if compact and line.startswith(_COMPACT_RULES):
            line = line.replace('", "', '","')
        lines.append(line)
    return "\n".join(lines)


def _check_schema(schema: dict[str, Any]) -> None:
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ConstraintError(f"invalid JSON schema at '/{where}': {exc.message}") from None
    problem = unsupported_keyword(schema)
    if problem is not None:
        raise ConstraintError(f"unsupported JSON schema: {problem}")


def _with_whitespace(ebnf: str, pattern: str) -> Any:
    """The JSON grammar `ebnf` with every whitespace place matching `pattern` instead."""
    import xgrammar as xgr

    lines, places = [], 0
    for line in ebnf.splitlines():
        name, sep, body = line.partition(" ::= ")
        if sep and body == _WHITESPACE_BODY:
            line, places = f"{name} ::= ({_WHITESPACE_RULE})", places + 1
        lines.append(line)
    if not places:
        raise ConstraintError(
            "whitespace_pattern: this grammar library's JSON grammar has no whitespace places"
        )
    try:
        whitespace = str(xgr.Grammar.from_regex(pattern))
    except RuntimeError as exc:
        raise ConstraintError(f"whitespace_pattern does not compile: {_message(exc)}") from None
    names = {line.partition(" ::= ")[0] for line in whitespace.splitlines()}

    def rename(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "root":
            return _WHITESPACE_RULE
        return f"{_WHITESPACE_RULE}_{token}" if token in names else token

    lines += [_EBNF_TOKEN.sub(rename, line) for line in whitespace.splitlines() if line]
    return xgr.Grammar.from_ebnf("\n".join(lines))


def _choice_grammar(choices: list[str]) -> Any:
    import xgrammar as xgr

    # EBNF string literals take JSON's escapes (quotes, backslashes, control characters).
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def build_grammar(request: dict[str, Any]) -> Any:
    """The constraint as an `xgrammar.Grammar`; `ConstraintError` or xgrammar's `RuntimeError`."""
    import xgrammar as xgr

    kind = request["kind"]
    if kind in ("json", "json_object"):
        return _json_grammar(request)
    if kind == "regex":
        return xgr.Grammar.from_regex(request["value"])
    if kind == "choice":
        return _choice_grammar(list(request["choices"]))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(request["value"])
    raise ConstraintError(f"unknown constraint kind {kind!r}")


def _message(exc: BaseException) -> str:
    return _LOG_PREFIX.sub("", str(exc).strip())[:2000]


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    what = {"regex": "the regex", "grammar": "the grammar", "choice": "the choices"}.get(
        str(request.get("kind")), "the JSON schema"
    )
    try:
        grammar = build_grammar(request)
        start = time.perf_counter()
        compiled = _compiler.compile_grammar(grammar)
        seconds = time.perf_counter() - start
        return {
            "ebnf": str(grammar),
            "compiled": compiled.serialize_json() if request.get("masks", True) else None,
            "bytes": int(compiled.memory_size_bytes),
            "seconds": seconds,
        }
    except MemoryError:
        return {"error": f"compiling {what} needed more memory than a constraint may use", "reason": "memory"}
    except RecursionError:
        return {"error": f"{what} is nested too deeply", "reason": "invalid"}
    except ConstraintError as exc:
        return {"error": str(exc), "reason": "invalid"}
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse and conversion errors
        if "bad_alloc" in str(exc):  # its C++ side ran into the memory cap
            return {
                "error": f"compiling {what} needed more memory than a constraint may use",
                "reason": "memory",
            }
        return {"error": f"{what} does not compile: {_message(exc)}", "reason": "invalid"}


def _warm(init: dict[str, Any] | None) -> None:
    global _compiler
    import xgrammar as xgr

    assert init is not None
    info = xgr.TokenizerInfo.deserialize_json(init["tokenizer_info"])
    # One thread: the worker must not take more than one core from the engine.
    _compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    for request in (
        {"kind": "json", "value": '{"type": "object", "properties": {"a": {"type": "integer"}}}'},
        {"kind": "regex", "value": "[a-z]+"},
    ):
        _answer({"disable_any_whitespace": False, **request})


def main() -> None:
    run_worker(_answer, _warm, takes_init=True)


if __name__ == "__main__":
    main()

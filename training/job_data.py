"""Training files of the fine-tuning API: what a line may hold, how it maps to the training recipe, and
how many tokens and positions it will take. Torch-free: the API checks uploads with it, the worker
reads the same examples from it.

A file is JSONL (one object per line, every line the same shape) or, named `*.csv`, the E2E release's
CSV (`mr,ref`). Each shape maps to one of the training CLI's data formats, so a job trains exactly what
`prefixserve train --format <format>` would on the same rows:

| shape | line | source | target | as `prefixserve train` |
|---|---|---|---|---|
| prompt_completion | `{"prompt", "completion"}` | prompt | completion | `--format jsonl --plain-format` |
| chat | `{"messages": [{"role", "content"}, ...]}` ending with the assistant's | the messages before it, `role: content` lines, then `assistant:` (`render_chat`; the task's `chat_template` renders a request the same way) | the last message | `--format jsonl --plain-format` |
| source_target | `{"source", "target"}` | source | target | `--format jsonl` |
| document_summary | `{"document", "summary"}` | document | summary | `--format xsum` |
| e2e | `{"mr", "ref"}`, or E2E CSV | the MR in the paper's form | ref | `--format e2e` |

A GPT-2 task is then served with the prompt the recipe trained on: `source + "<|endoftext|>"` for the
plain shapes, `" " + source + "<|endoftext|>"` for the others (docs/training.md). Errors name the line
(`DataFileError`): the API refuses the upload with them, or fails the job with them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training.formats import Truncation, default_truncation, e2e_source

__all__ = [
    "SHAPES",
    "DataFileError",
    "FileExample",
    "ModelShape",
    "Shape",
    "count_training_tokens",
    "parse_file",
    "chat_template",
    "render_chat",
    "steps_per_epoch",
]


@dataclass(frozen=True)
class Shape:
    """A line shape: its keys, the training CLI's data format it maps to, and whether sources take
    the paper's form (a leading space before a GPT-2 source, `<s>` opening a BART target)."""

    name: str
    keys: tuple[str, ...]
    data_format: str
    paper: bool

    @property
    def truncation(self) -> Truncation:
        return default_truncation(self.data_format)


SHAPES = {
    s.name: s
    for s in (
        Shape("prompt_completion", ("prompt", "completion"), "jsonl", False),
        Shape("chat", ("messages",), "jsonl", False),
        Shape("source_target", ("source", "target"), "jsonl", True),
        Shape("document_summary", ("document", "summary"), "xsum", True),
        Shape("e2e", ("mr", "ref"), "e2e", True),
    )
}
CHAT_ROLES = ("system", "user", "assistant")


class DataFileError(ValueError):
    """A training file the recipe cannot use; `line` is 1-based (None: the file as a whole)."""

    def __init__(self, message: str, line: int | None = None, code: str = "invalid_training_file") -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.code = code


@dataclass(frozen=True)
class FileExample:
    """One training pair and the line it came from."""

    line: int
    source: str
    target: str


def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """The source text of a chat example: one `role: content` line per message, then `assistant:`."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_template(separator: str) -> str:
    """A Jinja chat template that renders a conversation as `render_chat` does, then `separator` (the
    recipe's `<|endoftext|>` after a GPT-2 source; nothing for BART). A chat job stores it with its
    prefix, so `/v1/chat/completions` calls the task with the prompt it trained on."""
    return "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:" + separator


def parse_file(data: bytes, filename: str) -> tuple[Shape, list[FileExample]]:
    """The file's shape and examples; raises `DataFileError` naming the first bad line."""
    if not data.strip():
        raise DataFileError("the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFileError("not UTF-8 text", line) from None
    if filename.lower().endswith(".csv"):
        return SHAPES["e2e"], _parse_e2e_csv(text)
    shape: Shape | None = None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataFileError(
                f"not valid JSON ({getattr(exc, 'msg', 'too deeply nested')})", number
            ) from None
        if not isinstance(row, dict):
            raise DataFileError(f"expected a JSON object, got {type(row).__name__}", number)
        found = _shape_of(row, number)
        if shape is not None and found is not shape:
            raise DataFileError(
                f"a {found.name} line ({', '.join(found.keys)}) in a file of {shape.name} lines "
                f"({', '.join(shape.keys)}): every line must have the same fields",
                number,
            )
        shape = found
        examples.append(_example(row, shape, number))
    assert shape is not None  # the file was not blank
    return shape, examples


def _shape_of(row: dict[str, object], line: int) -> Shape:
    keys = set(row)
    for shape in SHAPES.values():
        if keys == set(shape.keys):
            return shape
    for shape in SHAPES.values():  # the closest shape names the wrong or missing field
        if keys & set(shape.keys):
            extra = sorted(keys - set(shape.keys))
            missing = sorted(set(shape.keys) - keys)
            what = "; ".join(
                part
                for part in (
                    f"unknown field(s) {', '.join(map(repr, extra))}" if extra else "",
                    f"missing {', '.join(map(repr, missing))}" if missing else "",
                )
                if part
            )
            raise DataFileError(f"{what} for a {shape.name} line ({', '.join(shape.keys)})", line)
    expected = " or ".join("{" + ", ".join(s.keys) + "}" for s in SHAPES.values())
    raise DataFileError(f"fields {sorted(keys)}: expected {expected}", line)


def _text(value: object, field: str, line: int) -> str:
    if not isinstance(value, str):
        raise DataFileError(f"{field!r} must be a string, got {type(value).__name__}", line)
    if not value.strip():
        raise DataFileError(f"{field!r} is empty", line)
    return value.strip()


def _example(row: dict[str, object], shape: Shape, line: int) -> FileExample:
    if shape.name == "chat":
        return _chat_example(row["messages"], line)
    source_key, target_key = shape.keys
    source = _text(row[source_key], source_key, line)
    if shape.name == "e2e":
        source = _e2e(source, line)
    return FileExample(line, source, _text(row[target_key], target_key, line))


def _chat_example(messages: object, line: int) -> FileExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataFileError("'messages' must be a list of at least two messages", line)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataFileError(f"messages[{i}] must be an object with exactly 'role' and 'content'", line)
        if message["role"] not in CHAT_ROLES:
            raise DataFileError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", line)
        _text(message["content"], f"messages[{i}].content", line)
    if messages[-1]["role"] != "assistant":
        raise DataFileError("the last message must be the assistant's (it is what the task learns)", line)
    return FileExample(line, render_chat(messages[:-1]), messages[-1]["content"].strip())


def _e2e(mr: str, line: int) -> str:
    try:
        return e2e_source(mr, paper=True)
    except ValueError as exc:
        raise DataFileError(f"'mr': {exc}", line) from None


def _parse_e2e_csv(text: str) -> list[FileExample]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
        raise DataFileError(f"an E2E CSV needs columns 'mr' and 'ref', found {reader.fieldnames}", 1)
    examples = []
    try:
        for row in reader:
            line = reader.line_num
            if not (row.get("mr") or "").strip():
                continue
            examples.append(
                FileExample(line, _e2e(row["mr"].strip(), line), _text(row.get("ref") or "", "ref", line))
            )
    except csv.Error as exc:
        raise DataFileError(f"not valid CSV ({exc})", reader.line_num) from None
    if not examples:
        raise DataFileError("the file has no rows")
    return examples


@dataclass(frozen=True)
class ModelShape:
    """What of the base model decides whether an example fits."""

    is_encoder_decoder: bool
    max_positions: int


def count_training_tokens(
    examples: Sequence[FileExample],
    shape: Shape,
    count: Callable[[list[str]], list[int]],
    model: ModelShape,
    prefix_length: int,
) -> int:
    """Tokens of one pass over `examples` as the recipe encodes them (`training.data`: truncated,
    with separators); raises `DataFileError` for an example the model's positions cannot hold after
    a prefix of `prefix_length` (positions of real tokens start at L)."""
    trunc = shape.truncation
    leading = " " if shape.paper or model.is_encoder_decoder else ""
    sources = count([leading + ex.source for ex in examples])
    targets = count([" " + ex.target for ex in examples])
    total = 0
    for ex, src, tgt in zip(examples, sources, targets, strict=True):
        src, tgt = min(src, trunc.max_source_tokens), min(tgt, trunc.max_target_tokens)
        if model.is_encoder_decoder:
            lengths = (src + 2, tgt + 1 + int(shape.paper))  # <s> source </s>; start [<s>] target
        else:
            lengths = (src + 1 + tgt + 1,)  # source <eos> target <eos>
        longest = max(lengths)
        if prefix_length + longest > model.max_positions:
            raise DataFileError(
                f"the example takes {longest} tokens after truncation; with a prefix of {prefix_length} "
                f"it needs {prefix_length + longest} positions and the model has {model.max_positions}",
                ex.line,
            )
        total += sum(lengths)
    return total


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps of one epoch (one micro-batch per step, as a job trains)."""
    return math.ceil(num_examples / batch_size)

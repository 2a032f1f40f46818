"""Structured logs: one JSON object per line (or plain text), with the request id on every line.

`configure_logging(format, level)` is called once by `server.main`. The request id of the request
being served lives in a context variable (`request_context`), set by the API's request middleware,
so every log line emitted while serving a request carries it without passing it around.
`log_request` writes the one access line per request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

ACCESS_LOGGER = "prefixserve.access"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@dataclass
class RequestContext:
    """What one request's access log line reports; routes fill in what they learn while serving."""

    request_id: str  # the client's X-Request-Id if it sent a sane one, else `internal_id`
    internal_id: str = ""  # always server-made and unique: what the engine knows the request by
    method: str = ""
    endpoint: str = ""
    tenant: str | None = None
    task: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None
    prefix_version: int | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    error_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Run by the request middleware when the response is done, whatever happened (e.g. release a
    # rate-limit lease of a stream whose client vanished before the first byte). Not logged.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "cleanups") or value is None:
                continue
            if f.name == "internal_id" and value == self.request_id:
                continue
            out[f.name] = value
        out.update(self.extra)
        return out


request_context: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "prefixserve_request_context", default=None
)


def current_request_id() -> str | None:
    ctx = request_context.get()
    return ctx.request_id if ctx is not None else None


def engine_request_id() -> str:
    """A unique id for the engine: the request's internal id (a fresh one outside a request)."""
    ctx = request_context.get()
    return ctx.internal_id if ctx is not None and ctx.internal_id else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            # Tracebacks go to the log (for operators), never into a response.
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs: time level logger [request id] message key=value...

    Messages and fields carry client-chosen text (task names, rejected values in error messages), so
    control characters are escaped (`\\n`, `\\x1b`...): a client can never start a forged log line.
    A traceback keeps its lines, each indented, under the line it belongs to.
    """

    def format(self, record: logging.LogRecord) -> str:
        head = f"{self.formatTime(record)} {record.levelname} {record.name} {escape_control(record.getMessage())}"
        request_id = current_request_id()
        extras = " ".join(
            f"{k}={escape_control(str(v))}"
            for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")
        )
        prefix = f"[{request_id}] " if request_id else ""
        line = f"{prefix}{head} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + textwrap.indent(self.formatException(record.exc_info), "    ", lambda _: True)
        return line


# C0 and C1 controls, DEL, and the Unicode line/paragraph separators some viewers break lines at.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """`text` with every control character written as its Python escape (a newline becomes `\\n`)."""
    return _CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Route the root logger (and uvicorn's) to stderr in the chosen format. Idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own handlers would print a second, unstructured line; let its records reach ours.
    # Its access log is replaced by ours (`log_request`), which knows tenant, task and tokens.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def log_request(ctx: RequestContext) -> None:
    """The access line for a finished request (status >= 500 at ERROR, 4xx at WARNING...)."""
    status = ctx.status or 0
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    logging.getLogger(ACCESS_LOGGER).log(level, "request", extra=ctx.fields())

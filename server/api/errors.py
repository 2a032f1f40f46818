"""Error responses: every failure is `{"error": str, "error_type": str}` with the right status.

Routes raise domain exceptions (the engine's, the store's, the artifact validator's, our own
`ApiError`) and never build error responses themselves; `install_error_handlers` maps each class to
a status code, a TGI-compatible `error_type` ("validation", "overloaded", "generation", ... so the
`text-generation` client raises its matching exception) and, for transient failures, `Retry-After`.
Unexpected exceptions are handled in `middleware.RequestMiddleware`: logged with their traceback,
answered with a 500 that names only the request id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store.artifact_types import ArtifactError
from prefix_store.base import (
    InvalidName,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
)
from server.engine.errors import (
    EngineStopped,
    InvalidConstraint,
    InvalidPrefix,
    InvalidRequest,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    UnknownTask,
)
from server.logging import current_request_id, request_context

logger = logging.getLogger(__name__)

RETRY_AFTER_OVERLOADED_S = 1
RETRY_AFTER_UNAVAILABLE_S = 2


class ErrorResponse(BaseModel):
    """The body of every error response (TGI's error shape)."""

    error: str
    error_type: str


class ApiError(HTTPException):
    """An error raised by our own code with its status, type and optional Retry-After (seconds)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        error_type: str,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = str(retry_after)
        super().__init__(status_code=status_code, detail=message, headers=all_headers or None)
        self.error_type = error_type
        self.param = param  # OpenAI's `param`: the request field at fault, on the OpenAI routes


class Draining(ApiError):
    """The server is shutting down: new generations are refused so in-flight ones can finish."""

    def __init__(self) -> None:
        super().__init__(503, "server is shutting down; retry on another replica", "unavailable", 1)


class RateLimited(ApiError):
    """A tenant exceeded its request rate or concurrency limit."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(429, message, "rate_limited", retry_after)


class BodyTooLarge(ApiError):
    """The request body exceeds `max_body_bytes` (raised by the body-size middleware)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes", "payload_too_large")


@dataclass(frozen=True)
class _Mapping:
    status: int
    error_type: str
    retry_after: int | None = None


# Order matters: the first class that matches wins (subclasses before their bases).
_MAPPINGS: list[tuple[type[Exception], _Mapping]] = [
    # A structured-output constraint that cannot be served (OpenAI's and vLLM's 400).
    (InvalidConstraint, _Mapping(400, "invalid_request_error")),
    (InvalidRequest, _Mapping(422, "validation")),  # includes PromptTooLong
    (InvalidName, _Mapping(422, "validation")),
    (ArtifactError, _Mapping(422, "validation")),
    (InvalidPrefix, _Mapping(422, "validation")),
    (UnknownTask, _Mapping(404, "not_found")),
    (TaskNotFound, _Mapping(404, "not_found")),
    (VersionNotFound, _Mapping(404, "not_found")),
    (QueueFull, _Mapping(429, "overloaded", RETRY_AFTER_OVERLOADED_S)),
    (QueueTimeout, _Mapping(503, "overloaded", RETRY_AFTER_OVERLOADED_S)),
    (StoreCorrupt, _Mapping(503, "unavailable", RETRY_AFTER_UNAVAILABLE_S)),
    (StoreUnavailable, _Mapping(503, "unavailable", RETRY_AFTER_UNAVAILABLE_S)),
    (EngineStopped, _Mapping(503, "unavailable", RETRY_AFTER_UNAVAILABLE_S)),
    (RequestFailed, _Mapping(424, "generation")),
    (StoreError, _Mapping(500, "store_error")),
]

# 5xx failures whose exception text describes our infrastructure: the message clients get instead.
_CLIENT_MESSAGES: dict[type[Exception], str] = {
    StoreCorrupt: "this task's stored data is corrupt (logged for the operator); uploading a new "
    "version of the task repairs it",
    StoreUnavailable: "the prefix store is unavailable; retry later",
    EngineStopped: "the engine is not accepting requests; retry later or on another replica",
    StoreError: "internal prefix store error",
}

_HTTP_ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    409: "conflict",
    422: "validation",
    429: "rate_limited",
    503: "unavailable",
}

# The OpenAI-compatible routes. On them a generation failure is a 500 (OpenAI clients expect a 5xx,
# TGI's 424 elsewhere), and errors use OpenAI's body shape: the `openai` client raises the right
# exception class from the status alone, but puts the reason into the exception's text only from
# `{"error": {"message": ...}}`.
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/files", "/v1/fine_tuning")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class OpenAIErrorResponse(BaseModel):
    """The error body on the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def error_body(
    status: int, message: str, error_type: str, path: str = "", param: str | None = None
) -> dict[str, Any]:
    """Our `{"error", "error_type"}`, or OpenAI's shape on the OpenAI routes."""
    if is_openai_path(path):
        return {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return {"error": message, "error_type": error_type}


def error_response(
    status: int,
    message: str,
    error_type: str,
    headers: dict[str, str] | None = None,
    path: str = "",
    param: str | None = None,
) -> JSONResponse:
    """A JSON error response (see `error_body` for the shape)."""
    ctx = request_context.get()
    if ctx is not None:
        ctx.error_type = error_type
    body = error_body(status, message, error_type, path, param)
    return JSONResponse(body, status_code=status, headers=headers)


def describe_exception(exc: Exception, path: str = "") -> tuple[int, str, str, dict[str, str] | None]:
    """(status, message, error_type, headers) for a known exception class, else a 500."""
    if isinstance(exc, StarletteHTTPException):
        error_type = getattr(exc, "error_type", None) or _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        return exc.status_code, str(exc.detail), error_type, dict(exc.headers or {}) or None
    for cls, mapping in _MAPPINGS:
        if isinstance(exc, cls):
            status = mapping.status
            if isinstance(exc, RequestFailed) and is_openai_path(path):
                status = 500
            message = str(exc) or cls.__name__
            if isinstance(exc, RequestFailed):
                message = f"generation failed: {message}"
            if cls in _CLIENT_MESSAGES:
                # The exception names Redis URLs, hosts, file paths or exception reprs: those are for
                # the log (handle_known); the client gets what it can act on and the request id.
                message = _with_request_id(_CLIENT_MESSAGES[cls])
            headers = {"Retry-After": str(mapping.retry_after)} if mapping.retry_after else None
            return status, message, mapping.error_type, headers
    return 500, _with_request_id("internal server error"), "internal", None


def _with_request_id(message: str) -> str:
    request_id = current_request_id()
    return message if request_id is None else f"{message} (request id {request_id})"


def validation_message(exc: RequestValidationError) -> str:
    """One line naming each invalid field, e.g. `body.parameters.top_p: Input should be <= 1`.

    The rejected input values are deliberately left out (they may be large or sensitive).
    """
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into our error responses."""

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, validation_message(exc), "validation", path=request.url.path)

    async def handle_known(request: Request, exc: Exception) -> JSONResponse:
        status, message, error_type, headers = describe_exception(exc, request.url.path)
        if status >= 500 and error_type != "unavailable":
            logger.error("request failed: %s", exc, exc_info=exc)
        elif status >= 500:  # transient (store down, engine stopped): the reason, without a traceback
            logger.warning("request failed: %s", exc)
        param = getattr(exc, "param", None)
        return error_response(status, message, error_type, headers, path=request.url.path, param=param)

    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_known)
    for cls, _ in _MAPPINGS:
        app.add_exception_handler(cls, handle_known)


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the error model for each status."""
    descriptions = {
        400: "Malformed request body (e.g. not UTF-8)",
        401: "Missing or invalid API key",
        403: "The key's role does not allow this",
        404: "No such task (or it belongs to another tenant)",
        409: "The object's state does not allow it (e.g. cancelling a finished job)",
        413: "Request body too large",
        422: "Invalid request (names the problem)",
        424: "Generation failed",
        429: "Overloaded or rate limited (see Retry-After)",
        500: "Internal error",
        503: "Unavailable: store down, engine stopped or draining (see Retry-After)",
    }
    model = OpenAIErrorResponse if openai else ErrorResponse
    return {s: {"model": model, "description": descriptions.get(s, "Error")} for s in statuses}

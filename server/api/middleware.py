"""Pure ASGI middleware (no `BaseHTTPMiddleware`: it buffers and breaks streaming responses).

- `RequestMiddleware` (outermost): gives every request an id (a sane incoming `X-Request-Id`, else a
  new one), puts it in every response header and in a context variable for logs, counts
  `prefixserve_requests_total{endpoint,status}`, writes one access log line when the response is
  complete (after the last byte of a stream), and turns any exception that escaped the app into a
  500 `{"error", "error_type"}` with the traceback in the log only.
- `server.api.admission.AdmissionMiddleware` (next inside): key, queue and body-size checks made
  before the body is read.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import describe_exception, error_body
from server.logging import RequestContext, log_request, request_context
from server.metrics import Metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UNMATCHED_ENDPOINT = "unmatched"  # 404s for unknown paths share one label: paths come from the public


def _endpoint_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ENDPOINT


class RequestMiddleware:
    """Request id, access log, request metrics, and the last-resort 500 handler."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        internal_id = uuid.uuid4().hex
        # A client's id is echoed and logged, but never given to the engine: clients reuse ids
        # (retries), and the engine needs them unique.
        request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else internal_id
        ctx = RequestContext(request_id=request_id, internal_id=internal_id, method=scope.get("method", ""))
        token = request_context.set(ctx)
        start = time.perf_counter()
        started = False
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            ctx.endpoint = _endpoint_label(scope)
            ctx.extra.setdefault("duration_s", round(time.perf_counter() - start, 6))
            self.metrics.observe_http(ctx.endpoint, ctx.status or 500)
            log_request(ctx)

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                ctx.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            status, _, error_type, _ = describe_exception(exc, scope.get("path", ""))
            if status >= 500:
                logger.error("unhandled error", exc_info=exc)
            ctx.error_type = error_type
            if not started:
                await send_json_error(scope, send_wrapper, exc)
            else:
                ctx.status = 500 if ctx.status is None else ctx.status
        finally:
            for cleanup in ctx.cleanups:
                try:
                    await cleanup()
                except Exception:
                    logger.exception("request cleanup failed")
            finish()
            request_context.reset(token)


async def send_json_error(scope: Scope, send: Send, exc: Exception) -> None:
    """Answer `exc`, mapped as the app's handlers map it, without reading the request body."""
    path = scope.get("path", "")
    status, message, error_type, headers = describe_exception(exc, path)
    ctx = request_context.get()
    if ctx is not None:
        ctx.error_type = error_type
    body = json.dumps(error_body(status, message, error_type, path)).encode()
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

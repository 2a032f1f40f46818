"""Server-sent events: framing and the streaming response used by the TGI and OpenAI stream routes.

Two framings, each the one its API's own servers send (both valid SSE): TGI's routes frame events as
axum does, `data:{json}` without a space; OpenAI's routes as OpenAI and vLLM do, `data: {json}` and
`data: [DONE]`, which some load generators depend on (they strip the prefix `data: ` literally).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}


def sse_data(payload: dict[str, Any] | str) -> bytes:
    """One TGI `data:` event. Dicts are compact JSON (one line, so no multi-line `data:` framing needed)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data:{text}\n\n".encode()


def openai_sse_data(payload: dict[str, Any] | str) -> bytes:
    """One OpenAI `data: ` event (`data: [DONE]` for the string "[DONE]"); compact JSON as above."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


# OpenAPI for an SSE response: the schema describes one event (what schemathesis validates per event).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
SSE_CONTENT = {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}

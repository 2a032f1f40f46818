"""The structured-output benchmark (`prefixserve bench --profile structured`): the same burst through
our server with and without JSON schemas, on each engine backend, in one run.

The `*_json` runners are `server_native` / `server_vllm` with a JSON schema (OpenAI `response_format`)
on every other request. Its answers cannot end within the workload's `max_tokens` (an object with an
array of at least 100 enum strings: hundreds of characters), so every constrained request, like every
free one, generates exactly its `max_tokens` ("length"): the runners produce the same number of tokens,
and tokens/s compares what the grammar's masks cost per step. The warm-up requests carry the schema
too: it compiles (once, then cached) before the timed burst.
"""

from __future__ import annotations

from typing import Any

from loadtest.workload import RequestSpec

# A structured runner -> the same server without schemas (its ratio's base in the report).
STRUCTURED_RUNNERS = {"server_native_json": "server_native", "server_vllm_json": "server_vllm"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "amber"]}, "minItems": 100},
    },
    "required": ["id", "tags"],
}
# EOS ends a finished grammar; here none finishes, and ignore_eos cannot be combined with a schema.
SCHEMA_FIELDS: dict[str, object] = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "tags", "schema": SCHEMA}},
    "ignore_eos": False,
}


def schema_on_every_other(req: RequestSpec) -> dict[str, object]:
    """The schema on requests 0, 2, 4, ... (half of the burst), nothing on the others."""
    return SCHEMA_FIELDS if req.index % 2 == 0 else {}

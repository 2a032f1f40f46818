"""Request headers that steer scheduling and canary routing.

- `X-Priority: interactive | batch`: the request's class within its tenant's fair-queue share
  (default: the API key's `priority`). A class only splits the tenant's own share, so any caller
  may choose either.
- `X-Route-Key: <string>`: pins the request to one version of a task whose traffic is split
  between versions (the same key always gets the same version); default: the request id.
"""

from __future__ import annotations

import dataclasses

from starlette.datastructures import Headers

from server.api.auth import Principal
from server.api.errors import ApiError

PRIORITY_HEADER = "x-priority"
ROUTE_KEY_HEADER = "x-route-key"
PRIORITIES = ("interactive", "batch")
MAX_ROUTE_KEY_LENGTH = 256


def routing_headers(headers: Headers, principal: Principal) -> Principal:
    """`principal` with the request's priority and route key; 422 for a malformed header."""
    priority = headers.get(PRIORITY_HEADER)
    if priority is not None:
        priority = priority.strip().lower()
        if priority not in PRIORITIES:
            raise ApiError(422, f"X-Priority must be one of {', '.join(PRIORITIES)}", "validation")
    route_key = headers.get(ROUTE_KEY_HEADER)
    if route_key is not None and not 1 <= len(route_key) <= MAX_ROUTE_KEY_LENGTH:
        raise ApiError(422, f"X-Route-Key must be 1-{MAX_ROUTE_KEY_LENGTH} characters", "validation")
    return dataclasses.replace(
        principal,
        priority=priority or principal.priority,
        route_key=route_key if route_key is not None else principal.route_key,
    )

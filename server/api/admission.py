"""Admission before the body: what a request may cost is decided from its route and headers alone.

FastAPI reads and parses a request's body *before* it runs the route's dependencies, so a check made
in a dependency comes after the work it should prevent: an unauthenticated 8 MB JSON body is parsed
(and its memory kept) just to answer 401, and a full queue is reported only after the body has been
parsed and the prompt tokenised. `AdmissionMiddleware` (pure ASGI, inside `RequestMiddleware`) answers
these cases before a byte of the body is read:

1. Routes that need an API key (their dependencies include `deps.authenticate`): 401 without a valid
   key. The dependency checks again later (cheap); this copy only keeps bodies from unknown callers.
2. Generation routes (POST routes tagged "generate" or "openai"): 503 while draining, and 429
   `overloaded` with `Retry-After` while the engine's queue is full (what TGI's router does).
3. The body limit that fits the route: multipart uploads `max_body_bytes`, every other route the much
   smaller `max_json_body_bytes`. 413 at once from `Content-Length`, or by counting the bytes of a
   chunked (or lying) body as they arrive.

Which routes are which is read from the app's routes on the first request, so new routes get the
right policy without being listed here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import AuthError
from server.api.deps import AppState, authenticate
from server.api.errors import ApiError, BodyTooLarge, Draining
from server.api.http_limits import HttpLimits
from server.api.middleware import send_json_error
from server.engine.errors import QueueFull

GENERATION_TAGS = frozenset({"generate", "openai"})


@dataclass(frozen=True)
class RoutePolicy:
    needs_key: bool
    generation: bool
    max_body_bytes: int


def _calls(dependant: Dependant, target: object) -> bool:
    return dependant.call is target or any(_calls(d, target) for d in dependant.dependencies)


def _is_form(route: APIRoute) -> bool:
    return any(isinstance(p.field_info, params.Form) for p in route.dependant.body_params)


def route_policies(routes: Iterable[BaseRoute], limits: HttpLimits) -> list[tuple[APIRoute, RoutePolicy]]:
    """Each API route with what admission checks before its body (see the module docstring)."""
    out = []
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        policy = RoutePolicy(
            needs_key=_calls(route.dependant, authenticate),
            generation="POST" in (route.methods or ()) and bool(GENERATION_TAGS & set(map(str, route.tags))),
            max_body_bytes=limits.max_body_bytes if _is_form(route) else limits.max_json_body_bytes,
        )
        out.append((route, policy))
    return out


class AdmissionMiddleware:
    """401 / 503 / 429 / 413 decided from the route and headers, before the body (module docstring)."""

    def __init__(self, app: ASGIApp, state: AppState, limits: HttpLimits) -> None:
        self.app = app
        self.state = state
        self.limits = limits
        self._policies: list[tuple[APIRoute, RoutePolicy]] | None = None
        self._default = RoutePolicy(
            needs_key=False, generation=False, max_body_bytes=limits.max_json_body_bytes
        )

    def policy(self, scope: Scope) -> RoutePolicy:
        if self._policies is None:  # the routes are complete once the app serves
            self._policies = route_policies(scope["app"].router.routes, self.limits)
        for route, policy in self._policies:
            if route.matches(scope)[0] == Match.FULL:
                return policy
        return self._default  # unknown path or method: the router answers 404/405 without the body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy(scope)
        refusal = self._refusal(scope, policy)
        if refusal is not None:
            await send_json_error(scope, send, refusal)
            return
        limit = policy.max_body_bytes
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI re-raises it from body parsing, our handlers answer 413.
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)

    def _refusal(self, scope: Scope, policy: RoutePolicy) -> Exception | None:
        """Why the request is refused before its body is read, or None."""
        headers = dict(scope.get("headers") or [])
        if policy.needs_key:
            try:
                self.state.auth.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
            except AuthError as exc:
                return ApiError(401, str(exc), "unauthorized", headers={"WWW-Authenticate": "Bearer"})
        if policy.generation:
            if self.state.draining:
                return Draining()
            if self.state.engine.queue_full:
                return QueueFull("the queue is full; retry later")
        if _declared_length(headers.get(b"content-length")) > policy.max_body_bytes:
            return BodyTooLarge(policy.max_body_bytes)  # the client may still be sending it: not read
        return None


def _declared_length(value: bytes | None) -> int:
    """Content-Length as a number (0 if absent or malformed: the HTTP parser rejects those first)."""
    if value is None or not value.isdigit():
        return 0
    return int(value) if len(value) <= 18 else 1 << 62  # no int() of a 5,000-digit header

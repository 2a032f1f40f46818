"""Admission before the body: what a request may cost is decided from its route and headers alone.

FastAPI reads and parses a request's body *before* it runs the route's dependencies, so a check made
in a dependency comes after the work it should prevent: an unauthenticated 8 MB JSON body is parsed
(and its memory kept) just to answer 401, and a full queue is reported only after the body has been
parsed and the prompt tokenised. `AdmissionMiddleware` (pure ASGI, inside `RequestMiddleware`) makes
these checks when the app asks for the first byte of the body, that is after routing (so the matched
route, `scope["route"]`, says what applies) and before anything is read:

1. Routes that need an API key (their dependencies include `deps.authenticate`): 401 without a valid
   key. The dependency checks again afterwards (cheap); this copy keeps bodies of unknown callers out.
2. Generation and tokenizer routes (POST routes tagged "generate", "openai" or "tokenize"): 503
   while draining, and 429
   `overloaded` with `Retry-After` when the engine's queue would refuse the caller's tenant now (full,
   and with fair scheduling no other tenant's request to push out): what TGI's router does.
3. Every route with a key: 429 when the tenant already has `tenant_max_connections` requests in
   flight (admitted, not yet answered), or half of `max_connections`, whichever is less, so one
   tenant's slow bodies or long streams cannot take every connection slot (bodies also have a read
   deadline: `server.http_protocol`).
4. The body limit that fits the route: multipart uploads `max_body_bytes`, every other route the much
   smaller `max_json_body_bytes` (`/tokenize`: no more than its longest input can take as JSON). 413 at once from `Content-Length`, or by counting the bytes of a
   chunked (or lying) body as they arrive.

A refusal is raised from `receive()` as an `HTTPException`, which FastAPI's body reading passes on
unchanged to our handlers. Routes without a body never read it, so nothing is refused here for them
(their dependencies check the key). The policy is derived from each route, so new routes get the
right one without being listed here.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import DEFAULT_TENANT, AuthError
from server.api.deps import AppState, authenticate
from server.api.errors import RETRY_AFTER_OVERLOADED_S, ApiError, BodyTooLarge, Draining
from server.limits import Limits

GENERATION_TAGS = frozenset({"generate", "openai", "tokenize"})  # tokenizer work is admitted alike


@dataclass(frozen=True)
class RoutePolicy:
    needs_key: bool
    generation: bool
    max_body_bytes: int


def _calls(dependant: Dependant, target: object) -> bool:
    return dependant.call is target or any(_calls(d, target) for d in dependant.dependencies)


def _is_form(route: APIRoute) -> bool:
    return any(isinstance(p.field_info, params.Form) for p in route.dependant.body_params)


# The most JSON bytes one character of a string can take (`\\uXXXX`), and room for the other fields.
JSON_BYTES_PER_CHAR = 6
JSON_ENVELOPE_BYTES = 4096


def route_policy(route: APIRoute, limits: Limits, tokenize_chars: int | None = None) -> RoutePolicy:
    """What admission checks before `route`'s body (see the module docstring). `tokenize_chars`: the
    longest `/tokenize` input; a body that cannot hold less is refused before it is read."""
    max_body = limits.max_body_bytes if _is_form(route) else _json_limit(limits)
    if tokenize_chars is not None and route.path_format == "/tokenize":
        max_body = min(max_body, tokenize_chars * JSON_BYTES_PER_CHAR + JSON_ENVELOPE_BYTES)
    return RoutePolicy(
        needs_key=_calls(route.dependant, authenticate),
        generation="POST" in (route.methods or ()) and bool(GENERATION_TAGS & set(map(str, route.tags))),
        max_body_bytes=max_body,
    )


class AdmissionMiddleware:
    """401 / 503 / 429 / 413 decided from the route and headers, before the body (module docstring)."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.limits = state.config.limits
        self._policies: dict[int, RoutePolicy] = {}  # by id() of the (long-lived) route object
        self._in_flight: dict[str, int] = {}  # tenant -> its requests past admission, not yet answered
        self.pending: dict[str, int] = {}  # tenant -> generation requests admitted, not yet in the engine
        self._default = RoutePolicy(
            needs_key=False, generation=False, max_body_bytes=_json_limit(self.limits)
        )

    def policy(self, route: object) -> RoutePolicy:
        if not isinstance(route, APIRoute):
            return self._default
        policy = self._policies.get(id(route))
        if policy is None:
            tokenize_chars = self.limits.max_tokenize_chars or self.state.max_prompt_chars
            policy = self._policies[id(route)] = route_policy(route, self.limits, tokenize_chars)
        return policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int | None = None
        received = 0
        holder: str | None = None  # the tenant whose connection count this request holds
        pending: _Pending | None = None  # its place among generation requests not yet in the engine

        async def admitted_receive() -> Message:
            nonlocal limit, received, holder, pending
            if limit is None:  # the first read: the router has matched, nothing is read yet
                policy = self.policy(scope.get("route"))
                holder = self._admit(scope, policy)
                if holder is not None and policy.generation:
                    pending = _Pending(self.pending, holder)
                    _pending_release.set(pending)  # start_generation releases it once queued
                limit = policy.max_body_bytes
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, admitted_receive, send)
        finally:
            if holder is not None:
                self._release_connection(holder)
            if pending is not None:
                pending.release()  # if it never reached the engine (refused, or failed before)

    def _burst_refusal(self, tenant: str) -> str | None:
        """A burst arrives before any of it is queued: the engine's queue looks empty to each request
        while hundreds are still being parsed and tokenised. So the requests admitted but not yet in
        the engine (`pending`) count too: a tenant may have at most as many as there is room for in
        the queue and the free batch rows; beyond that it is refused now, before any work."""
        engine, limits = self.state.engine, self.limits
        room = max(0, limits.max_waiting - engine.num_waiting)
        room += max(0, limits.max_batch_size - engine.num_running)
        if self.pending.get(tenant, 0) >= room:
            return f"server overloaded: {room} requests fit the queue and batch now, all taken"
        return None

    def _tenant_connection_bound(self) -> int:
        """A tenant's requests in flight: `tenant_max_connections`, and never more than half of
        `max_connections`, so that one tenant's slow bodies or long streams always leave another
        tenant connections to be served on (uvicorn answers 503 past `max_connections`). 0: none."""
        if self.state.auth.single_tenant:
            return 0
        share = max(1, self.limits.max_connections // 2)
        return min(self.limits.tenant_max_connections or share, share)

    def _hold_connection(self, tenant: str) -> None:
        """Count one more request of `tenant` in flight, or 429 when it already has its bound."""
        bound = self._tenant_connection_bound()
        held = self._in_flight.get(tenant, 0)
        if bound and held >= bound:
            raise ApiError(
                429,
                f"this tenant already has {held} requests in flight (the limit is {bound})",
                "rate_limited",
                retry_after=RETRY_AFTER_OVERLOADED_S,
            )
        self._in_flight[tenant] = held + 1

    def _release_connection(self, tenant: str) -> None:
        left = self._in_flight.get(tenant, 1) - 1
        if left > 0:
            self._in_flight[tenant] = left
        else:
            self._in_flight.pop(tenant, None)

    def _admit(self, scope: Scope, policy: RoutePolicy) -> str | None:
        """Raise (as an `HTTPException`) why the request is refused before its body is read; else
        the tenant whose in-flight count it now holds (None for routes without a key)."""
        headers = dict(scope.get("headers") or [])
        tenant = DEFAULT_TENANT
        if policy.needs_key:
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                tenant = self.state.auth.authenticate(authorization).tenant
            except AuthError as exc:
                raise ApiError(
                    401, str(exc), "unauthorized", headers={"WWW-Authenticate": "Bearer"}
                ) from None
        if policy.generation:
            if self.state.draining:
                raise Draining()
            refusal = self.state.engine.queue_refusal(
                tenant
            )  # fair scheduling: would *this tenant* be refused
            if refusal is None:
                refusal = self._burst_refusal(tenant)
            if refusal is not None:  # it says which bound: the tenant's own or the server's
                raise ApiError(429, refusal, "overloaded", retry_after=RETRY_AFTER_OVERLOADED_S)
        if _declared_length(headers.get(b"content-length")) > policy.max_body_bytes:
            raise BodyTooLarge(policy.max_body_bytes)  # the client may still be sending it: not read
        if not policy.needs_key:
            return None
        self._hold_connection(tenant)  # last: a refusal above holds nothing
        return tenant


class _Pending:
    """One admitted generation request not yet in the engine; `release()` once it is (or is done)."""

    def __init__(self, counts: dict[str, int], tenant: str) -> None:
        counts[tenant] = counts.get(tenant, 0) + 1
        self._counts: dict[str, int] | None = counts
        self._tenant = tenant

    def release(self) -> None:
        counts, self._counts = self._counts, None
        if counts is None:
            return
        left = counts.get(self._tenant, 1) - 1
        if left > 0:
            counts[self._tenant] = left
        else:
            counts.pop(self._tenant, None)


# The current request's place among the pending ones (set at admission, in the request's context).
_pending_release: ContextVar[_Pending | None] = ContextVar("prefixserve_pending", default=None)


def left_engine_queue() -> None:
    """The current request no longer counts as pending admission: its engine request was added (or
    refused), or the request is over. Idempotent; a no-op outside a request."""
    pending = _pending_release.get()
    if pending is not None:
        pending.release()


def _json_limit(limits: Limits) -> int:
    return min(limits.max_json_body_bytes, limits.max_body_bytes)


def _declared_length(value: bytes | None) -> int:
    """Content-Length as a number (0 if absent or malformed: the HTTP parser rejects those first)."""
    if value is None or not value.isdigit():
        return 0
    return int(value) if len(value) <= 18 else 1 << 62  # no int() of a 5,000-digit header

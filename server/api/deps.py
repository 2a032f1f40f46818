"""Shared state of one app, and the FastAPI dependencies routes declare with `Annotated[..., Depends()]`.

`AppState` is built once by `create_app` and hung on `app.state.prefixserve`; routes never read
globals or the environment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefix_store.base import PrefixStore
from prefix_store.model_spec import ModelSpec
from server.api.auth import Authenticator, AuthError, Principal
from server.api.errors import ApiError
from server.api.ratelimit import NoLimiter, TenantLimiter
from server.logging import request_context
from server.metrics import Metrics


class EngineLike(Protocol):
    """What the API uses of `server.engine.Engine` (kept structural so tests can read it at a glance)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def generate(self, request: Any) -> Any: ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout_s: float = ...) -> None: ...


@dataclass(frozen=True)
class ApiConfig:
    """Plain values the routes need, taken from `Settings` by `create_app`."""

    model_id: str
    model_dtype: str = "float32"
    device_type: str = "cpu"
    max_artifact_bytes: int = 64 << 20
    max_prefix_length: int = 512
    max_batch_size: int = 32
    shutdown_grace_s: float = 30.0
    # Upload quotas (issue 13); 0 = unlimited.
    tenant_max_tasks: int = 0
    tenant_max_stored_bytes: int = 0
    tenant_uploads_per_minute: float = 0.0  # enforced by `AppState.upload_limiter`; here for messages
    max_training_metadata_bytes: int = 16 << 10


@dataclass
class AppState:
    """Everything one app instance serves with."""

    config: ApiConfig
    engine: EngineLike
    store: PrefixStore
    spec: ModelSpec
    metrics: Metrics
    auth: Authenticator
    limiter: TenantLimiter
    upload_limiter: TenantLimiter = field(default_factory=NoLimiter)  # upload attempts per tenant
    draining: bool = False  # set on SIGTERM: readiness false, new generations refused
    started: bool = False  # lifespan start-up finished (store + engine running)
    background: list[asyncio.Task[None]] = field(default_factory=list)


def get_state(request: Request) -> AppState:
    return request.app.state.prefixserve


State = Annotated[AppState, Depends(get_state)]

# Declares the scheme in OpenAPI (the docs' "Authorize" button); errors are ours, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def authenticate(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller's tenant and role from `Authorization: Bearer <key>` (401 without a valid key)."""
    try:
        principal = state.auth.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        raise ApiError(401, str(exc), "unauthorized", headers={"WWW-Authenticate": "Bearer"}) from None
    ctx = request_context.get()
    if ctx is not None:
        ctx.tenant = principal.tenant
    return principal


def require_manage(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Only keys with role "manage" may upload, delete or roll back prefixes (403 otherwise)."""
    if not principal.can_manage:
        raise ApiError(403, "this API key may not manage prefixes (role 'generate')", "forbidden")
    return principal


Caller = Annotated[Principal, Depends(authenticate)]
Manager = Annotated[Principal, Depends(require_manage)]

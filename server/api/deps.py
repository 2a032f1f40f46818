"""Shared state of one app, and the FastAPI dependencies routes declare with `Annotated[..., Depends()]`.

`AppState` is built once by `create_app` and hung on `app.state.prefixserve`; routes never read
globals or the environment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from modeling.model_spec import ModelSpec
from prefix_store.artifact_types import UploadChecks
from prefix_store.base import PrefixStore
from server.api.auth import Authenticator, AuthError, Principal
from server.api.errors import ApiError
from server.api.ratelimit import NoLimiter, TenantLimiter
from server.api.traffic import routing_headers
from server.engine.chat_render import ChatRenderPool
from server.engine.interface import ServingEngine
from server.limits import Limits
from server.logging import request_context
from server.metrics import Metrics


@dataclass(frozen=True)
class ApiConfig:
    """Plain values the routes need, taken from `Settings` by `create_app`."""

    model_id: str
    limits: Limits  # the one limits object (`Settings.limits`)
    model_dtype: str = "float32"
    device_type: str = "cpu"
    chat_template: str | None = None  # Jinja text of PREFIXSERVE_CHAT_TEMPLATE


@dataclass
class AppState:
    """Everything one app instance serves with."""

    config: ApiConfig
    engine: ServingEngine
    store: PrefixStore
    spec: ModelSpec
    metrics: Metrics
    auth: Authenticator
    uploads: UploadChecks  # the artifact checks (torch code, injected: the API imports no torch)
    limiter: TenantLimiter
    max_prompt_chars: int  # longer prompts cannot fit the model (`generation.prompt_char_limit`)
    chat_renderer: ChatRenderPool  # renders chat templates in worker processes (server.api.chat_templates)
    upload_limiter: TenantLimiter = field(default_factory=NoLimiter)  # per-tenant upload rate
    # The fine-tuning jobs' side of the app (`server.api.fine_tuning.service.FineTuning`, which builds on
    # this state: typed loosely here to keep the dependency one-way).
    fine_tuning: Any = None
    tokenizer_thread: Any = None  # the tokenizer routes' one worker thread (`tokens.tokenizer_routes_thread`)
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
    principal = routing_headers(request.headers, principal)  # X-Priority, X-Route-Key
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

"""Probes and metrics: `/health` (liveness), `/ready` (readiness), `/metrics` (Prometheus).

None of them needs an API key. `/health` never touches the store or the engine: a Redis outage must
not get the pod restarted. `/ready` is 200 only while the engine loop runs and we are not draining.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import State
from server.api.errors import ApiError, error_responses
from server.api.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Liveness: the process answers HTTP."""
    return HealthResponse(status="ok")


@router.get("/ready", response_model=HealthResponse, responses=error_responses(503))
async def ready(state: State) -> HealthResponse:
    """Readiness: model loaded, engine loop running, not shutting down (503 with the reason otherwise)."""
    if state.draining:
        raise ApiError(503, "not ready: draining for shutdown", "unavailable", retry_after=5)
    if not state.started:
        raise ApiError(503, "not ready: starting up", "unavailable", retry_after=5)
    if not state.engine.healthy:
        raise ApiError(503, "not ready: the engine loop has stopped", "unavailable", retry_after=5)
    return HealthResponse(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}
    },
)
async def metrics(state: State) -> Response:
    """Prometheus exposition of this replica's metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Canary rollouts: traffic weights over a task's versions, promote in one call.

    GET    /v1/prefixes/{task}/traffic     the split ({} = every request gets the current version)
    PUT    /v1/prefixes/{task}/traffic     {"weights": {"3": 10, "2": 90}}  (manage)
    DELETE /v1/prefixes/{task}/traffic     end the split: the current version for all  (manage)
    POST   /v1/prefixes/{task}/promote     {"version": 3}: current = 3 and the split ends  (manage)

Rolling back is the same call as promoting (`/rollback` also ends a split). Each request is pinned
by `X-Route-Key` (else its request id) to one version: `prefix_store.traffic.pick_version`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field, StrictInt

from prefix_store.base import MAX_NAME_LENGTH, validate_name
from prefix_store.traffic import MAX_SPLIT_VERSIONS, InvalidSplit, split_to_json, validate_split
from server.api.deps import Caller, Manager, State
from server.api.errors import ApiError, error_responses
from server.api.prefix_admin import store_call, version_out
from server.api.schemas import PrefixVersion, RollbackRequest

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])

TaskName = Annotated[str, Path(min_length=1, max_length=MAX_NAME_LENGTH, description="Task name.")]


class TrafficSplit(BaseModel):
    """Percent of requests per version ("version": percent, summing to 100); {} = no split. Keys are
    canonical version numbers ("3", not "03" or " 3"), percents JSON integers (not "10", 10.0, true)."""

    weights: dict[str, StrictInt] = Field(
        max_length=MAX_SPLIT_VERSIONS, examples=[{"3": 10, "2": 90}], description="version -> percent"
    )


@router.get("/{task}/traffic", response_model=TrafficSplit, responses=error_responses(401, 404, 422, 503))
async def get_traffic(state: State, caller: Caller, task: TaskName) -> TrafficSplit:
    """The task's traffic split."""
    with store_call(state, "describe"):
        info = await state.store.describe(caller.tenant, validate_name(task, "task"))
    return TrafficSplit(weights=split_to_json(info.split))


@router.put(
    "/{task}/traffic", response_model=TrafficSplit, responses=error_responses(400, 401, 403, 404, 422, 503)
)
async def set_traffic(state: State, caller: Manager, task: TaskName, body: TrafficSplit) -> TrafficSplit:
    """Serve the named kept versions to these percents of requests (same key, same version)."""
    try:
        split = validate_split(body.weights)
    except InvalidSplit as exc:
        raise ApiError(422, f"weights: {exc}", "validation") from None
    with store_call(state, "set_split"):
        await state.store.set_split(caller.tenant, validate_name(task, "task"), split)
    return TrafficSplit(weights=split_to_json(split))


@router.delete(
    "/{task}/traffic", status_code=204, response_class=Response, responses=error_responses(401, 403, 404, 503)
)
async def end_traffic(state: State, caller: Manager, task: TaskName) -> Response:
    """End the split: every request gets the current version again."""
    with store_call(state, "set_split"):
        await state.store.set_split(caller.tenant, validate_name(task, "task"), {})
    return Response(status_code=204)


@router.post(
    "/{task}/promote", response_model=PrefixVersion, responses=error_responses(400, 401, 403, 404, 422, 503)
)
async def promote(state: State, caller: Manager, task: TaskName, body: RollbackRequest) -> PrefixVersion:
    """Make a kept version current for every request and end the split, in one store step."""
    with store_call(state, "rollback"):
        info = await state.store.rollback(caller.tenant, validate_name(task, "task"), body.version)
    return version_out(info)

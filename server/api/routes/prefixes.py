"""Prefix management: `/v1/prefixes` upload, list, describe, delete, rollback.

Every store call is made with the caller's tenant, so a task of another tenant is simply not found
(404, never 403: existence does not leak). Reads need any valid key; writes need role "manage".
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile

from prefix_store.base import MAX_NAME_LENGTH, validate_name
from server.api.chat_templates import check_uploaded_template
from server.api.deps import Caller, Manager, State
from server.api.errors import error_responses
from server.api.prefix_admin import detail_out, note_broken, store_call, validate_upload, version_out
from server.api.quotas import check_capacity
from server.api.schemas import PrefixDetail, PrefixPage, PrefixVersion, RollbackRequest
from server.logging import request_context

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])

TaskName = Annotated[str, Path(min_length=1, max_length=MAX_NAME_LENGTH, description="Task name.")]


def _log_task(task: str) -> None:
    ctx = request_context.get()
    if ctx is not None:
        ctx.task = task


@router.post(
    "",
    status_code=201,
    response_model=PrefixVersion,
    responses=error_responses(400, 401, 403, 413, 422, 429, 503),
)
async def upload_prefix(
    state: State,
    caller: Manager,
    task: Annotated[str, Form(min_length=1, max_length=MAX_NAME_LENGTH, description="Task name.")],
    artifact: Annotated[UploadFile | None, File(description="A prefixserve artifact (.safetensors).")] = None,
    adapter_config: Annotated[UploadFile | None, File(description="PEFT adapter_config.json.")] = None,
    adapter_model: Annotated[UploadFile | None, File(description="PEFT adapter_model.safetensors.")] = None,
) -> PrefixVersion:
    """Validate and store a new version of `task`'s prefix; it becomes current at once."""
    _log_task(task)
    await (await state.upload_limiter.acquire(caller.tenant)).release()  # 429 + Retry-After over the rate
    try:
        data, metadata = await validate_upload(state, task, artifact, adapter_config, adapter_model)
        await check_uploaded_template(state, caller.tenant, metadata)
    except Exception:
        state.metrics.observe_upload("invalid")
        raise
    await check_capacity(state, caller.tenant, task, len(data))
    try:
        with store_call(state, "put"):
            info = await state.store.put(caller.tenant, task, data, metadata)
    except Exception:
        state.metrics.observe_upload("error")
        raise
    state.metrics.observe_upload("created")
    return version_out(info)


@router.get("", response_model=PrefixPage, responses=error_responses(401, 422, 503))
async def list_prefixes(
    state: State,
    caller: Caller,
    cursor: Annotated[
        str | None, Query(max_length=MAX_NAME_LENGTH, description="From `next_cursor`.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PrefixPage:
    """The caller's tasks in name order, one page at a time (a task whose stored data is corrupt is
    left out, logged and counted in `prefixserve_store_corrupt_total`)."""
    if cursor is not None:
        validate_name(cursor, "cursor")
    with store_call(state, "list_tasks"):
        page = await state.store.list_tasks(caller.tenant, cursor, limit)
    note_broken(state, caller.tenant, page)
    return PrefixPage(items=[version_out(v) for v in page.items], next_cursor=page.next_cursor)


@router.get("/{task}", response_model=PrefixDetail, responses=error_responses(401, 404, 422, 503))
async def describe_prefix(state: State, caller: Caller, task: TaskName) -> PrefixDetail:
    """A task's current version and all kept versions."""
    _log_task(task)
    with store_call(state, "describe"):
        info = await state.store.describe(caller.tenant, validate_name(task, "task"))
    return detail_out(info.current, info.versions)


@router.delete(
    "/{task}", status_code=204, response_class=Response, responses=error_responses(401, 403, 404, 422, 503)
)
async def delete_prefix(state: State, caller: Manager, task: TaskName) -> Response:
    """Delete a task and all its versions (requests already running finish with the old prefix)."""
    _log_task(task)
    with store_call(state, "delete"):
        await state.store.delete(caller.tenant, validate_name(task, "task"))
    return Response(status_code=204)


@router.post(
    "/{task}/rollback", response_model=PrefixVersion, responses=error_responses(400, 401, 403, 404, 422, 503)
)
async def rollback_prefix(
    state: State, caller: Manager, task: TaskName, body: RollbackRequest
) -> PrefixVersion:
    """Make a kept earlier version current again; returns that version."""
    _log_task(task)
    with store_call(state, "rollback"):
        info = await state.store.rollback(caller.tenant, validate_name(task, "task"), body.version)
    return version_out(info)

"""OpenAI's `/v1/fine_tuning/jobs`: create, list, retrieve, events, checkpoints, cancel, pause, resume.

Jobs are the caller's tenant's: another tenant's id is 404. Creating and changing a job need a key
with role "manage"; reading needs any key. Listings are newest first with OpenAI's cursor (`after`:
the last id of the previous page). Logic: `server.api.fine_tuning.jobs`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query

from prefix_store.jobs.model import event_id, event_seq
from server.api.deps import Caller, Manager
from server.api.errors import error_responses
from server.api.fine_tuning import jobs
from server.api.fine_tuning.schemas import (
    FineTuningJob,
    ListPage,
    checkpoint_id,
    checkpoint_out,
    event_out,
    job_out,
    page,
)
from server.api.fine_tuning.service import Service, api_errors

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="A job id (`ftjob-...`).")]
After = Annotated[str | None, Query(max_length=64, description="The last id of the previous page.")]
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post(
    "", response_model=FineTuningJob, responses=error_responses(400, 401, 403, 404, 429, 503, openai=True)
)
async def create_job(
    service: Service,
    caller: Manager,
    body: Annotated[dict[str, Any], Body(description="OpenAI's job request.")],
) -> FineTuningJob:
    """Create a job: checked at once (400 names the `param`), its files checked while `validating_files`."""
    return job_out(await jobs.create(service, caller.tenant, body))


@router.get("", response_model=ListPage, responses=error_responses(401, 503, openai=True))
async def list_jobs(service: Service, caller: Caller, after: After = None, limit: Limit = 20) -> ListPage:
    listing = await service.store.list_jobs(caller.tenant, after, limit)
    return page([job_out(j) for j in listing.items], listing.has_more)


@router.get("/{job_id}", response_model=FineTuningJob, responses=error_responses(401, 404, 503, openai=True))
async def retrieve_job(service: Service, caller: Caller, job_id: JobId) -> FineTuningJob:
    with api_errors():
        return job_out(await service.store.get_job(job_id, caller.tenant))


@router.get(
    "/{job_id}/events", response_model=ListPage, responses=error_responses(401, 404, 503, openai=True)
)
async def list_events(
    service: Service, caller: Caller, job_id: JobId, after: After = None, limit: Limit = 20
) -> ListPage:
    """The job's events, newest first."""
    with api_errors():
        await service.store.get_job(job_id, caller.tenant)
        before = event_seq(after) if after is not None else None
        if after is not None and before is None:
            return page([], False)
        listing = await service.store.list_events(job_id, before, limit)
    return page([event_out(e, event_id(e.seq)) for e in listing.items], listing.has_more)


@router.get(
    "/{job_id}/checkpoints", response_model=ListPage, responses=error_responses(401, 404, 503, openai=True)
)
async def list_checkpoints(
    service: Service, caller: Caller, job_id: JobId, after: After = None, limit: Limit = 10
) -> ListPage:
    """The job's checkpoints (resume points; its last three), newest first."""
    with api_errors():
        job = await service.store.get_job(job_id, caller.tenant)
    records = sorted(job.checkpoints, key=lambda c: int(c["step"]), reverse=True)
    if after is not None:
        ids = [checkpoint_id(job, int(c["step"])) for c in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    items = [checkpoint_out(job, c) for c in records[:limit]]
    return page(items, len(records) > limit)


@router.post(
    "/{job_id}/{action}",
    response_model=FineTuningJob,
    responses=error_responses(401, 403, 404, 409, 503, openai=True),
)
async def change_job(
    service: Service, caller: Manager, job_id: JobId, action: Literal["cancel", "pause", "resume"]
) -> FineTuningJob:
    """`cancel`: a running job's worker stops within seconds and nothing is stored. `pause`: a running
    job's worker checkpoints and lets it go. `resume`: a paused job continues from that checkpoint."""
    return job_out(await jobs.change(service, caller.tenant, job_id, action))

"""A serving replica's background work for fine-tuning jobs, once a second:

- the jobs-by-status gauges (`prefixserve_fine_tuning_jobs`, `..._queue_length`) from the job store;
- jobs left in `validating_files` (their replica stopped before it finished, or this one restarted)
  are validated again (`validation.validate`);
- trained jobs are published: a worker left the artifact in the job's work directory, and a replica
  stores it as the next version of the job's task through the same checks and quotas as an upload
  to `POST /v1/prefixes` (`prefix_admin.validate_artifact`, the task's chat template, `check_capacity`),
  then marks the job succeeded with `fine_tuned_model` = the task. Replicas claim a job before storing
  it (`phase` publishing, with a lease), so one job is stored once; a replica that dies mid-way leaves
  the claim to lapse and another stores it (at worst a second identical version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import anyio

from prefix_store.artifact_types import ArtifactError
from prefix_store.base import InvalidName, StoreUnavailable
from prefix_store.jobs import policy
from prefix_store.jobs.base import artifact_path, remove_work
from prefix_store.jobs.model import PUBLISHING, RUNNING, SUCCEEDED, TRAINED, VALIDATING, Job
from server.api.chat_templates import check_uploaded_template
from server.api.errors import ApiError
from server.api.fine_tuning.service import FineTuning
from server.api.fine_tuning.validation import validate
from server.api.prefix_admin import store_call, validate_artifact
from server.api.quotas import check_capacity

logger = logging.getLogger(__name__)

VALIDATION_GRACE_S = 30.0  # a job validating longer than this lost its replica: validate it again
PUBLISH_LEASE_S = 120.0  # a replica storing a trained prefix holds the job this long


async def start(service: FineTuning) -> None:
    """Start the app's fine-tuning work (its lifespan calls this; `service.close()` stops it)."""
    await service.store.start()
    service.spawn(run(service), "prefixserve-fine-tuning")


async def run(service: FineTuning) -> None:
    """The loop (module docstring); a job store that is down is logged once, not every second."""
    first, reachable = True, True
    while True:
        try:
            await tick(service, restarted=first)
            first = False
            if not reachable:
                logger.info("fine-tuning: the job store answers again")
            reachable = True
        except StoreUnavailable as exc:
            if reachable:
                logger.warning("fine-tuning: the job store is unavailable: %s", exc)
            reachable = False
        except Exception:
            logger.exception("fine-tuning: background work failed")
        await asyncio.sleep(service.poll_s)


async def tick(service: FineTuning, restarted: bool = False) -> None:
    """One round of the loop."""
    service.state.metrics.observe_fine_tuning(await service.store.status_counts())
    now = service.clock()
    for job in await service.store.active_jobs():
        if job.status == VALIDATING and (restarted or now - job.created_at > VALIDATION_GRACE_S):
            service.spawn(validate(service, job.id), f"validate-{job.id}")
        elif job.phase == TRAINED or (job.phase == PUBLISHING and (job.lease_until or 0.0) < now):
            await publish(service, job.id)


async def publish(service: FineTuning, job_id: str) -> None:
    """Store a trained job's prefix and mark it succeeded, or fail it with the checks' reason."""
    store, state = service.store, service.state

    def claim(j: Job) -> None:
        lapsed = j.phase == PUBLISHING and (j.lease_until or 0.0) < service.clock()
        if j.status != RUNNING or not (j.phase == TRAINED or lapsed):
            raise policy.Conflict(f"job is {j.status} ({j.phase})")
        j.phase, j.worker, j.lease_until = PUBLISHING, service.replica, service.clock() + PUBLISH_LEASE_S

    try:
        job = await store.update_job(job_id, claim)
    except policy.Conflict:
        return
    path = artifact_path(store.data_dir, job.id)
    try:
        data, metadata = await validate_artifact(
            state, job.task, await anyio.to_thread.run_sync(path.read_bytes)
        )
        await check_uploaded_template(state, job.tenant, metadata)
        await check_capacity(state, job.tenant, job.task, len(data))
        with store_call(state, "put"):
            info = await state.store.put(job.tenant, job.task, data, metadata)
    except StoreUnavailable:
        await _release(service, job)  # the prefix store is down: another round stores it
        raise
    except (ArtifactError, ApiError, InvalidName, OSError) as exc:
        state.metrics.observe_upload("invalid")
        code = getattr(exc, "error_type", None) or "invalid_artifact"
        message = f"the trained prefix could not be stored: {getattr(exc, 'detail', None) or exc}"

        def failed(j: Job) -> None:
            j.fail(code, message, None, service.clock())

        if await service.conclude(job.id, _held(service), failed, message, "error"):
            await anyio.to_thread.run_sync(remove_work, store.data_dir, job.id)
        return
    state.metrics.observe_upload("created")
    state.metrics.fine_tuning_trained_tokens.inc(job.trained_tokens or 0)

    def succeeded(j: Job) -> None:
        j.status, j.fine_tuned_model, j.version = SUCCEEDED, job.task, info.version
        j.finish(service.clock())

    stored = f"Stored as version {info.version} of task {job.task!r}: call it with model={job.task!r}"
    if await service.conclude(job.id, _held(service), succeeded, stored):
        await anyio.to_thread.run_sync(
            remove_work, store.data_dir, job.id
        )  # stored: checkpoints no longer needed


def _held(service: FineTuning) -> Callable[[Job], None]:
    def guard(j: Job) -> None:
        if j.phase != PUBLISHING or j.worker != service.replica:
            raise policy.Conflict("no longer held by this replica")

    return guard


async def _release(service: FineTuning, job: Job) -> None:
    def back(j: Job) -> None:
        if j.phase == PUBLISHING and j.worker == service.replica:
            j.phase, j.worker, j.lease_until = TRAINED, None, None

    with contextlib.suppress(StoreUnavailable):  # if the store is down, the claim lapses on its own
        await service.store.update_job(job.id, back)

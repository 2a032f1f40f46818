"""The rules of a job's life, as pure functions over `Job` records (no I/O: the stores apply them
inside their atomic updates, the tests drive them with hand-made jobs).

- Which queued job a free worker takes (`pick_next`): fair share across tenants. The tenant with the
  fewest running jobs goes first (a tenant at `max_running_per_tenant` is skipped), ties go to the
  tenant that started a job longest ago (round robin, so one tenant's long queue cannot starve
  another's single job), then first come, first served within the tenant.
- What cancel, pause and resume do in each status (`cancel`, `pause`, `resume`): each either changes
  the job or raises `Conflict` saying why it cannot.
- When a worker's claim has lapsed (`lease_expired`): a worker renews its lease while it trains; a job
  whose lease ran out lost its worker (killed, or cut off) and goes back to the queue, to resume from
  its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prefix_store.jobs.model import (
    CANCELLED,
    PAUSED,
    PUBLISHING,
    QUEUED,
    RUNNING,
    TRAINED,
    Job,
)


class Conflict(Exception):
    """The job is in a state where the requested change cannot happen (HTTP 409)."""


def pick_next(
    queued: Iterable[Job],
    running: Iterable[Job],
    last_start: Mapping[str, float],
    max_running_per_tenant: int = 0,
) -> Job | None:
    """The queued job a free worker should take next (module docstring); None when none may start."""
    busy: dict[str, int] = {}
    for job in running:
        busy[job.tenant] = busy.get(job.tenant, 0) + 1
    best: tuple[int, float, float, int] | None = None
    chosen: Job | None = None
    for job in queued:
        held = busy.get(job.tenant, 0)
        if max_running_per_tenant > 0 and held >= max_running_per_tenant:
            continue
        key = (held, last_start.get(job.tenant, 0.0), job.queued_at or 0.0, job.seq)
        if best is None or key < best:
            best, chosen = key, job
    return chosen


def lease_expired(job: Job, now: float) -> bool:
    """A running job whose worker stopped renewing its claim (only before training ended: a trained
    job waits for a serving replica, not a worker)."""
    return job.status == RUNNING and job.phase is None and (job.lease_until or 0.0) < now


def requeue(job: Job, now: float) -> None:
    """Back to the queue, keeping its checkpoints: the next worker resumes from the latest."""
    job.status = QUEUED
    job.queued_at = now
    job.worker = job.lease_until = None
    job.estimated_finish = None


def cancel(job: Job, now: float) -> None:
    """Cancel a job that has not finished. A running job is cancelled at once; its worker sees it at
    its next lease renewal and stops without storing anything."""
    if job.status == CANCELLED:
        return
    if job.terminal:
        raise Conflict(f"the job already {job.status}; only an unfinished job can be cancelled")
    if job.phase in (TRAINED, PUBLISHING):
        raise Conflict(
            "the job finished training and its prefix is being stored; it can no longer be cancelled"
        )
    job.status = CANCELLED
    job.finish(now)


def pause(job: Job) -> None:
    """Pause a queued or running job: a running job's worker checkpoints and lets it go."""
    if job.status == PAUSED:
        return
    if job.status not in (QUEUED, RUNNING) or job.phase is not None:
        raise Conflict(f"a {_state(job)} job cannot be paused")
    job.status = PAUSED
    job.worker = job.lease_until = None
    job.estimated_finish = None


def resume(job: Job, now: float) -> None:
    """Put a paused job back in the queue; it continues from its last checkpoint."""
    if job.status != PAUSED:
        raise Conflict(f"only a paused job can be resumed; this one is {_state(job)}")
    requeue(job, now)


def _state(job: Job) -> str:
    return job.phase if job.phase is not None and job.status == RUNNING else job.status


def estimated_finish(started_at: float, step_at_start: int, step: int, total_steps: int, now: float) -> int:
    """When the job should finish at the pace of this attempt (unix seconds)."""
    done = max(step - step_at_start, 1)
    per_step = max(now - started_at, 0.0) / done
    return int(now + per_step * max(total_steps - step, 0))


__all__ = [
    "Conflict",
    "cancel",
    "estimated_finish",
    "lease_expired",
    "pause",
    "pick_next",
    "requeue",
    "resume",
]

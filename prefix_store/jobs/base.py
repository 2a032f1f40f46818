"""The `JobStore` protocol: where training files, fine-tuning jobs and their events live.

Two backends keep the same rules (`tests/prefix_store/test_job_store.py` runs them against both):
`LocalJobStore` (a directory beside the local prefix store; the serving process and its worker
processes share it through a file lock) and `RedisJobStore` (every replica and worker of a fleet).
In both, a file's bytes and a job's work directory (checkpoints, the trained artifact) are in a
directory, `data_dir`: the local disk, or in a fleet a volume every pod mounts (ReadWriteMany).

Every change of a job goes through `update_job(job_id, change)`: the store reads the job, calls
`change(job)` (which edits it or raises `policy.Conflict`), and writes it back atomically with the
indexes that follow from its status, so two processes can never both claim, cancel or publish one job.
A tenant is part of every read a client makes: another tenant's id is simply not found.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from prefix_store.base import StoreError
from prefix_store.jobs import policy
from prefix_store.jobs.model import QUEUED, RUNNING, Job, JobEvent, TrainingFile

T = TypeVar("T")

MAX_PAGE = 100  # OpenAI's largest `limit`


class JobNotFound(StoreError):
    """No such job or file for this tenant (or it was deleted)."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, newest first; `has_more`: a further page exists (ask with the last id)."""

    items: list[T]
    has_more: bool


class JobStore(Protocol):
    """Training files, jobs and events (module docstring). Methods raise `JobNotFound` for an unknown
    (or another tenant's) id and `prefix_store.base.StoreUnavailable` when the backend cannot be reached."""

    data_dir: Path

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add_file(self, file: TrainingFile, data: bytes) -> TrainingFile:
        """Store a new file (its bytes first, then its record); returns it with its listing order set."""
        ...

    async def get_file(self, tenant: str, file_id: str) -> TrainingFile: ...

    async def read_file(self, tenant: str, file_id: str) -> bytes: ...

    async def list_files(self, tenant: str, after: str | None, limit: int) -> Page[TrainingFile]: ...

    async def count_files(self, tenant: str) -> int: ...

    async def delete_file(self, tenant: str, file_id: str) -> None: ...

    async def add_job(self, job: Job) -> Job:
        """Store a new job; returns it with its listing order set."""
        ...

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        """The job; with `tenant`, only if it is that tenant's (workers and replicas pass None)."""
        ...

    async def list_jobs(self, tenant: str, after: str | None, limit: int) -> Page[Job]: ...

    async def update_job(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply `change` atomically (module docstring); returns the job as stored. A `change` that
        raises leaves the job as it was and the exception propagates."""
        ...

    async def active_jobs(self) -> list[Job]:
        """Every job not yet finished (validating, queued, running, paused), with trained ones."""
        ...

    async def status_counts(self) -> dict[str, int]:
        """Jobs per status, all tenants."""
        ...

    async def add_event(self, job_id: str, event: JobEvent) -> None: ...

    async def list_events(self, job_id: str, after: int | None, limit: int) -> Page[JobEvent]:
        """Events newest first, those before event number `after` when given."""
        ...

    async def note_start(self, tenant: str, when: float) -> None:
        """Remember when a tenant's job last started (the fair-share tie break)."""
        ...

    async def last_starts(self) -> dict[str, float]: ...


def work_dir(data_dir: Path, job_id: str) -> Path:
    """Where a job's checkpoints and trained artifact live (shared by every worker that may resume it)."""
    return data_dir / "jobs" / job_id / "work"


def remove_work(data_dir: Path, job_id: str) -> None:
    """Delete a finished job's work directory: its checkpoints (with optimizer state, several times the
    prefix's size) and artifact are of no use once the job has ended; its records stay."""
    shutil.rmtree(work_dir(data_dir, job_id), ignore_errors=True)


def artifact_path(data_dir: Path, job_id: str) -> Path:
    """The trained artifact a worker leaves for a serving replica to store."""
    return work_dir(data_dir, job_id) / "artifact.safetensors"


async def claim_next(
    store: JobStore, worker: str, lease_s: float, max_running_per_tenant: int, now: Callable[[], float]
) -> tuple[Job | None, list[Job]]:
    """Take the next queued job for `worker` (fair share, `policy.pick_next`), first sending jobs whose
    worker was lost back to the queue. Returns (the claimed job or None, the jobs re-queued)."""
    requeued: list[Job] = []
    for _attempt in range(5):  # another worker may take the chosen job first: pick again
        active = await store.active_jobs()
        for lost in active:
            if policy.lease_expired(lost, now()):
                # Conflict: its worker renewed the lease, or another worker re-queued it first.
                with contextlib.suppress(policy.Conflict):
                    requeued.append(await store.update_job(lost.id, _requeue_if_expired(now)))
        active = await store.active_jobs()
        queued = [j for j in active if j.status == QUEUED]
        running = [j for j in active if j.status == RUNNING]
        job = policy.pick_next(queued, running, await store.last_starts(), max_running_per_tenant)
        if job is None:
            return None, requeued
        try:
            claimed = await store.update_job(job.id, _start(worker, lease_s, now))
        except policy.Conflict:
            continue
        await store.note_start(claimed.tenant, now())
        return claimed, requeued
    return None, requeued


def _requeue_if_expired(now: Callable[[], float]) -> Callable[[Job], None]:
    def change(job: Job) -> None:
        if not policy.lease_expired(job, now()):
            raise policy.Conflict("lease renewed")
        policy.requeue(job, now())

    return change


def _start(worker: str, lease_s: float, now: Callable[[], float]) -> Callable[[Job], None]:
    def change(job: Job) -> None:
        if job.status != QUEUED:
            raise policy.Conflict(f"job is {job.status}")
        job.status = RUNNING
        job.worker = worker
        job.lease_until = now() + lease_s
        job.started_at = now()
        job.attempts += 1

    return change

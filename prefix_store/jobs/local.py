"""`LocalJobStore`: training files and fine-tuning jobs in a directory (the embedded default).

Layout under `data_dir` (ids are checked `file-<hex>` / `ftjob-<hex>`, tenants `validate_name`d, so
every path component is plain):

    files/{tenant}/{file_id}.json     the file's record          files/{tenant}/{file_id}.data  its bytes
    jobs/{job_id}/job.json            the job's record           jobs/{job_id}/events.jsonl     its events
    jobs/{job_id}/work/               its work: checkpoints, the trained artifact (`base.work_dir`)
    index.json                        active job ids, per-tenant job order, status counts, last starts

The serving process and its worker processes share the directory: every change is made under an
exclusive `flock` on `.lock` (across processes and threads) and every record is replaced atomically
(temp file, fsync, rename), so a process killed mid-write leaves the old record or the new one. The
blocking file work runs in a thread. Files are 0600, directories 0700, as in the local prefix store.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefix_store.base import validate_name
from prefix_store.jobs.base import JobNotFound, Page
from prefix_store.jobs.files import FileArea, write_atomic
from prefix_store.jobs.model import (
    ACTIVE,
    FILE_PREFIX,
    JOB_PREFIX,
    STATUSES,
    Job,
    JobEvent,
    TrainingFile,
    is_id,
)

__all__ = ["LocalJobStore"]


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class LocalJobStore:
    """The `JobStore` on a directory (module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._files = FileArea(self.data_dir)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # ------------------------------------------------------------------ locking and the index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the store's lock; yields the index, written back if changed."""
        _mkdir(self.data_dir)
        with open(os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            before = json.dumps(index, sort_keys=True)
            yield index
            if json.dumps(index, sort_keys=True) != before:
                write_atomic(self.data_dir / "index.json", json.dumps(index).encode())

    def _read_index(self) -> dict[str, Any]:
        path = self.data_dir / "index.json"
        index: dict[str, Any] = json.loads(path.read_bytes()) if path.is_file() else {}
        for key in ("active", "jobs", "files_seq", "counts", "starts"):
            index.setdefault(key, {} if key != "active" else [])
        return index

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # ------------------------------------------------------------------ files

    def _file_dir(self, tenant: str) -> Path:
        return self.data_dir / "files" / validate_name(tenant, "tenant")

    def _file_path(self, tenant: str, file_id: str, suffix: str) -> Path:
        return self._files.path(tenant, file_id, suffix)

    async def add_file(self, file: TrainingFile, data: bytes) -> TrainingFile:
        def add() -> TrainingFile:
            with self._locked() as index:
                seq = index["files_seq"].get(file.tenant, 0) + 1
                index["files_seq"][file.tenant] = seq
                file.seq = seq
                self._files.write(
                    file.tenant, file.id, data
                )  # bytes first: a record never names missing bytes
                write_atomic(self._file_path(file.tenant, file.id, ".json"), file.to_json().encode())
            return file

        return await self._run(add)

    def _get_file(self, tenant: str, file_id: str) -> TrainingFile:
        path = self._file_path(tenant, file_id, ".json")
        try:
            return TrainingFile.from_json(path.read_bytes())
        except FileNotFoundError:
            raise JobNotFound(f"no file {file_id!r}") from None

    async def get_file(self, tenant: str, file_id: str) -> TrainingFile:
        return await self._run(self._get_file, tenant, file_id)

    async def read_file(self, tenant: str, file_id: str) -> bytes:
        def read() -> bytes:
            self._get_file(tenant, file_id)
            return self._files.read(tenant, file_id)

        return await self._run(read)

    def _all_files(self, tenant: str) -> list[TrainingFile]:
        folder = self._file_dir(tenant)
        if not folder.is_dir():
            return []
        files = []
        for path in folder.glob(f"{FILE_PREFIX}*.json"):
            with contextlib.suppress(FileNotFoundError):
                files.append(TrainingFile.from_json(path.read_bytes()))
        return sorted(files, key=lambda f: f.seq, reverse=True)

    async def list_files(self, tenant: str, after: str | None, limit: int) -> Page[TrainingFile]:
        files = await self._run(self._all_files, tenant)
        return _page(files, after, limit)

    async def count_files(self, tenant: str) -> int:
        return len(await self._run(self._all_files, tenant))

    async def delete_file(self, tenant: str, file_id: str) -> None:
        def delete() -> None:
            with self._locked():
                self._get_file(tenant, file_id)
                self._file_path(tenant, file_id, ".json").unlink()  # the record first: no record, no file
                self._files.delete(tenant, file_id)

        await self._run(delete)

    # ------------------------------------------------------------------ jobs

    def _job_dir(self, job_id: str) -> Path:
        if not is_id(job_id, JOB_PREFIX):
            raise JobNotFound(f"no job {job_id!r}")
        return self.data_dir / "jobs" / job_id

    def _read_job(self, job_id: str) -> Job:
        try:
            return Job.from_json((self._job_dir(job_id) / "job.json").read_bytes())
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r}") from None

    @staticmethod
    def _index_job(index: dict[str, Any], old: Job | None, job: Job) -> None:
        active = set(index["active"])
        if job.status in ACTIVE or job.phase is not None:
            active.add(job.id)
        else:
            active.discard(job.id)
        index["active"] = sorted(active)
        counts = index["counts"]
        if old is not None:
            counts[old.status] = counts.get(old.status, 0) - 1
        counts[job.status] = counts.get(job.status, 0) + 1

    async def add_job(self, job: Job) -> Job:
        def add() -> Job:
            with self._locked() as index:
                order = index["jobs"].setdefault(job.tenant, [])
                order.append(job.id)
                job.seq = len(order)
                write_atomic(_mkdir(self._job_dir(job.id)) / "job.json", job.to_json().encode())
                self._index_job(index, None, job)
            return job

        return await self._run(add)

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        job = await self._run(self._read_job, job_id)
        if tenant is not None and job.tenant != tenant:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    async def list_jobs(self, tenant: str, after: str | None, limit: int) -> Page[Job]:
        def list_() -> Page[Job]:
            ids = list(reversed(self._read_index()["jobs"].get(tenant, [])))
            if after is not None:
                ids = ids[ids.index(after) + 1 :] if after in ids else []
            jobs = [self._read_job(i) for i in ids[: limit + 1]]
            return Page(jobs[:limit], len(jobs) > limit)

        return await self._run(list_)

    async def update_job(self, job_id: str, change: Callable[[Job], None]) -> Job:
        def update() -> Job:
            with self._locked() as index:
                old = self._read_job(job_id)
                job = Job.from_json(old.to_json())
                change(job)
                write_atomic(self._job_dir(job_id) / "job.json", job.to_json().encode())
                self._index_job(index, old, job)
            return job

        return await self._run(update)

    async def active_jobs(self) -> list[Job]:
        def active() -> list[Job]:
            jobs = []
            for job_id in self._read_index()["active"]:
                with contextlib.suppress(JobNotFound):
                    jobs.append(self._read_job(job_id))
            return jobs

        return await self._run(active)

    async def status_counts(self) -> dict[str, int]:
        counts = (await self._run(self._read_index))["counts"]
        return {status: int(counts.get(status, 0)) for status in STATUSES}

    async def add_event(self, job_id: str, event: JobEvent) -> None:
        def add() -> None:
            with self._locked():
                line = event.to_json()
                with open(os.open(self._job_dir(job_id) / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as f:  # fmt: skip
                    f.write(line + "\n")

        await self._run(add)

    async def list_events(self, job_id: str, after: int | None, limit: int) -> Page[JobEvent]:
        def list_() -> Page[JobEvent]:
            path = self._job_dir(job_id) / "events.jsonl"
            lines = path.read_text().splitlines() if path.is_file() else []
            end = len(lines) if after is None else max(0, min(after, len(lines)))
            start = max(0, end - limit)
            events = []
            for i in range(end - 1, start - 1, -1):
                event = JobEvent.from_json(lines[i])
                event.seq = i
                events.append(event)
            return Page(events, start > 0)

        return await self._run(list_)

    async def note_start(self, tenant: str, when: float) -> None:
        def note() -> None:
            with self._locked() as index:
                index["starts"][tenant] = when

        await self._run(note)

    async def last_starts(self) -> dict[str, float]:
        return dict((await self._run(self._read_index))["starts"])


def _page(items: list[Any], after: str | None, limit: int) -> Page[Any]:
    """`items` (newest first) after the one whose id is `after`, `limit` of them."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return Page(items[:limit], len(items) > limit)

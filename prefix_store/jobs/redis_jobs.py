"""`RedisJobStore`: training files and fine-tuning jobs in Redis, shared by a fleet's serving replicas
and its training workers. File bytes and job work (checkpoints, artifacts) are in `data_dir`, a volume
every pod mounts (ReadWriteMany): Redis holds records, not gigabytes.

Keys (`P` = `{key_prefix}:ft`; ids are checked `file-<hex>` / `ftjob-<hex>`, tenants `validate_name`d):

    P:file:{id}      the file's record (JSON)         P:files:{tenant}  zset id -> creation order
    P:job:{id}       the job's record (JSON)          P:jobs:{tenant}   zset id -> creation order
    P:events:{id}    list of the job's events         P:seq:{tenant}    creation counter
    P:active         set of jobs not yet finished     P:counts          hash status -> jobs
    P:starts         hash tenant -> last job start (fair share)

`update_job` is optimistic: WATCH the job's key, read, apply the change, then MULTI/EXEC the record,
the active set and the counts together; a concurrent change aborts the EXEC and the update is retried
on the new record, so each change applies to the latest state exactly once. Run Redis with AOF
(as for the prefix store): jobs must survive a Redis restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, WatchError

from prefix_store.base import StoreUnavailable, validate_name
from prefix_store.jobs.base import JobNotFound, Page
from prefix_store.jobs.files import FileArea
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
from prefix_store.redis_connect import RedisConnector

__all__ = ["RedisJobStore"]

R = TypeVar("R")
MAX_UPDATE_ATTEMPTS = 50


class RedisJobStore:
    """The `JobStore` on Redis (module docstring)."""

    def __init__(
        self, url: str, data_dir: Path, key_prefix: str = "prefixserve", socket_timeout: float = 2.0,
        retries: int = 3, call_timeout_s: float = 5.0,
    ) -> None:  # fmt: skip
        self.data_dir = Path(data_dir)
        self._files = FileArea(self.data_dir)
        self._p = f"{key_prefix}:ft"
        self._timeout = call_timeout_s
        self._connector = RedisConnector(url)
        self._redis = self._connector.client(
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
            client_name=f"{key_prefix}:jobs",
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._redis.aclose()
        await self._connector.aclose()

    async def _call(self, op: str, work: Awaitable[R]) -> R:
        """Run one store call within the deadline; Redis failures are `StoreUnavailable`."""
        try:
            return await asyncio.wait_for(work, self._timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(f"job store unavailable during {op} ({type(exc).__name__})") from exc

    # ------------------------------------------------------------------ files

    def _file_key(self, file_id: str) -> str:
        if not is_id(file_id, FILE_PREFIX):
            raise JobNotFound(f"no file {file_id!r}")
        return f"{self._p}:file:{file_id}"

    async def add_file(self, file: TrainingFile, data: bytes) -> TrainingFile:
        await asyncio.to_thread(self._files.write, file.tenant, file.id, data)  # bytes first

        async def add() -> TrainingFile:
            file.seq = int(await self._redis.incr(f"{self._p}:seq:{validate_name(file.tenant, 'tenant')}"))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._file_key(file.id), file.to_json())
                pipe.zadd(f"{self._p}:files:{file.tenant}", {file.id: file.seq})
                await pipe.execute()
            return file

        try:
            return await self._call("add_file", add())
        except BaseException:  # no record: the bytes must not linger on the shared volume
            await asyncio.to_thread(self._files.delete, file.tenant, file.id)
            raise

    async def get_file(self, tenant: str, file_id: str) -> TrainingFile:
        raw = await self._call("get_file", self._redis.get(self._file_key(file_id)))
        file = TrainingFile.from_json(raw) if raw is not None else None
        if file is None or file.tenant != tenant:
            raise JobNotFound(f"no file {file_id!r}")
        return file

    async def read_file(self, tenant: str, file_id: str) -> bytes:
        await self.get_file(tenant, file_id)
        return await asyncio.to_thread(self._files.read, tenant, file_id)

    async def list_files(self, tenant: str, after: str | None, limit: int) -> Page[TrainingFile]:
        ids = await self._page_ids(f"{self._p}:files:{validate_name(tenant, 'tenant')}", after, limit)
        raws = (
            await self._call("list_files", self._redis.mget([self._file_key(i) for i in ids])) if ids else []
        )
        files = [TrainingFile.from_json(r) for r in raws if r is not None]
        return Page(files[:limit], len(ids) > limit)

    async def count_files(self, tenant: str) -> int:
        return int(await self._call("count_files", self._redis.zcard(f"{self._p}:files:{tenant}")))

    async def delete_file(self, tenant: str, file_id: str) -> None:
        await self.get_file(tenant, file_id)

        async def delete() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._file_key(file_id))
                pipe.zrem(f"{self._p}:files:{tenant}", file_id)
                await pipe.execute()

        await self._call("delete_file", delete())
        await asyncio.to_thread(self._files.delete, tenant, file_id)

    async def _page_ids(self, key: str, after: str | None, limit: int) -> list[str]:
        """Ids of a creation-ordered zset, newest first, after `after`: `limit + 1` of them at most."""
        top: str = "+inf"
        if after is not None:
            score = await self._call("page", self._redis.zscore(key, after))
            if score is None:
                return []
            top = f"({int(score)}"
        raw = await self._call("page", self._redis.zrevrangebyscore(key, top, "-inf", start=0, num=limit + 1))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    # ------------------------------------------------------------------ jobs

    def _job_key(self, job_id: str) -> str:
        if not is_id(job_id, JOB_PREFIX):
            raise JobNotFound(f"no job {job_id!r}")
        return f"{self._p}:job:{job_id}"

    async def add_job(self, job: Job) -> Job:
        async def add() -> Job:
            job.seq = int(await self._redis.incr(f"{self._p}:seq:{validate_name(job.tenant, 'tenant')}"))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._job_key(job.id), job.to_json())
                pipe.zadd(f"{self._p}:jobs:{job.tenant}", {job.id: job.seq})
                self._index(pipe, None, job)
                await pipe.execute()
            return job

        return await self._call("add_job", add())

    def _index(self, pipe: Any, old: Job | None, job: Job) -> None:
        if job.status in ACTIVE or job.phase is not None:
            pipe.sadd(f"{self._p}:active", job.id)
        else:
            pipe.srem(f"{self._p}:active", job.id)
        if old is not None:
            pipe.hincrby(f"{self._p}:counts", old.status, -1)
        pipe.hincrby(f"{self._p}:counts", job.status, 1)

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        raw = await self._call("get_job", self._redis.get(self._job_key(job_id)))
        job = Job.from_json(raw) if raw is not None else None
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"no job {job_id!r}")
        return job

    async def list_jobs(self, tenant: str, after: str | None, limit: int) -> Page[Job]:
        ids = await self._page_ids(f"{self._p}:jobs:{validate_name(tenant, 'tenant')}", after, limit)
        raws = await self._call("list_jobs", self._redis.mget([self._job_key(i) for i in ids])) if ids else []
        jobs = [Job.from_json(r) for r in raws if r is not None]
        return Page(jobs[:limit], len(ids) > limit)

    async def update_job(self, job_id: str, change: Callable[[Job], None]) -> Job:
        key = self._job_key(job_id)

        async def update() -> Job:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _attempt in range(MAX_UPDATE_ATTEMPTS):
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if raw is None:
                            raise JobNotFound(f"no job {job_id!r}")
                        old = Job.from_json(raw)
                        job = Job.from_json(raw)
                        change(job)  # may raise: the WATCH is dropped with the pipeline
                        pipe.multi()
                        pipe.set(key, job.to_json())
                        self._index(pipe, old, job)
                        await pipe.execute()
                        return job
                    except WatchError:
                        continue
            raise StoreUnavailable(f"job {job_id} changed {MAX_UPDATE_ATTEMPTS} times while being updated")

        return await self._call("update_job", update())

    async def active_jobs(self) -> list[Job]:
        async def active() -> list[Job]:
            ids = sorted(
                m.decode() if isinstance(m, bytes) else m
                for m in await self._redis.smembers(f"{self._p}:active")
            )
            raws = await self._redis.mget([self._job_key(i) for i in ids]) if ids else []
            return [Job.from_json(r) for r in raws if r is not None]

        return await self._call("active_jobs", active())

    async def status_counts(self) -> dict[str, int]:
        raw = await self._call("status_counts", self._redis.hgetall(f"{self._p}:counts"))
        counts = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        return {status: counts.get(status, 0) for status in STATUSES}

    async def add_event(self, job_id: str, event: JobEvent) -> None:
        await self._call(
            "add_event",
            self._redis.rpush(f"{self._p}:events:{self._job_key(job_id).rsplit(':', 1)[1]}", event.to_json()),
        )

    async def list_events(self, job_id: str, after: int | None, limit: int) -> Page[JobEvent]:
        key = f"{self._p}:events:{self._job_key(job_id).rsplit(':', 1)[1]}"

        async def list_() -> Page[JobEvent]:
            end = int(await self._redis.llen(key)) if after is None else max(0, after)
            start = max(0, end - limit)
            raws = await self._redis.lrange(key, start, end - 1) if end > start else []
            events = [JobEvent.from_json(r) for r in raws]
            for offset, event in enumerate(events):
                event.seq = start + offset
            return Page(events[::-1], start > 0)

        return await self._call("list_events", list_())

    async def note_start(self, tenant: str, when: float) -> None:
        await self._call("note_start", self._redis.hset(f"{self._p}:starts", tenant, str(when)))

    async def last_starts(self) -> dict[str, float]:
        raw = await self._call("last_starts", self._redis.hgetall(f"{self._p}:starts"))
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

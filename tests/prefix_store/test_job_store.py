"""One rule set for both job stores (`prefix_store.jobs`): the local directory and Redis (a real
Redis on 127.0.0.1:6379, a key prefix of its own per test).

Files and jobs belong to their tenant, listings are newest first and page with `after`, every change
of a job is atomic (concurrent updates all apply; concurrent claims take each job once), events come
back newest first, and a new store over the same data sees everything (a restarted process).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from prefix_store.jobs import policy
from prefix_store.jobs.base import JobNotFound, JobStore, claim_next
from prefix_store.jobs.factory import make_job_store
from prefix_store.jobs.model import (
    CANCELLED,
    FILE_PREFIX,
    JOB_PREFIX,
    QUEUED,
    RUNNING,
    Job,
    JobEvent,
    TrainingFile,
    new_id,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["local", "redis"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], JobStore]]:
    """A factory of stores over the same data (a second one is a restarted process)."""
    prefix = f"pstest-jobs-{uuid.uuid4().hex[:10]}"
    url = REDIS_URL if request.param == "redis" else None
    stores: list[JobStore] = []

    def new() -> JobStore:
        stores.append(make_job_store(url, tmp_path / "data", prefix))
        return stores[-1]

    yield new
    for store in stores:
        await store.close()
    if url:
        from redis.asyncio import Redis

        redis = Redis.from_url(url)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def training_file(tenant: str = "acme") -> TrainingFile:
    return TrainingFile(new_id(FILE_PREFIX), tenant, "t.jsonl", 3, int(time.time()), "prompt_completion", 1)


def job(tenant: str = "acme", status: str = QUEUED) -> Job:
    return Job(
        new_id(JOB_PREFIX), tenant, "tiny", "file-x", "task", 0, {}, 0, status=status, queued_at=time.time()
    )


async def test_files_belong_to_their_tenant_and_list_newest_first(make):
    store = make()
    files = [await store.add_file(training_file(), f"data {i}".encode()) for i in range(3)]
    other = await store.add_file(training_file("globex"), b"theirs")
    page = await store.list_files("acme", None, 2)
    assert [f.id for f in page.items] == [files[2].id, files[1].id] and page.has_more
    rest = await store.list_files("acme", files[1].id, 2)
    assert [f.id for f in rest.items] == [files[0].id] and not rest.has_more
    assert await store.read_file("acme", files[1].id) == b"data 1"
    assert await store.count_files("acme") == 3
    for call in (store.get_file("acme", other.id), store.read_file("globex", files[0].id),
                 store.delete_file("globex", files[0].id), store.get_file("acme", "../../etc/passwd")):  # fmt: skip
        with pytest.raises(JobNotFound):
            await call
    await store.delete_file("acme", files[0].id)
    with pytest.raises(JobNotFound):
        await store.read_file("acme", files[0].id)
    assert await store.count_files("acme") == 2


async def test_jobs_list_newest_first_and_count_by_status(make):
    store = make()
    jobs = [await store.add_job(job()) for _ in range(3)]
    await store.add_job(job("globex"))
    page = await store.list_jobs("acme", None, 2)
    assert [j.id for j in page.items] == [jobs[2].id, jobs[1].id] and page.has_more
    assert [j.id for j in (await store.list_jobs("acme", jobs[1].id, 5)).items] == [jobs[0].id]
    with pytest.raises(JobNotFound):
        await store.get_job(jobs[0].id, "globex")
    assert (await store.get_job(jobs[0].id)).tenant == "acme"  # workers and replicas read any job

    await store.update_job(jobs[0].id, lambda j: policy.cancel(j, time.time()))
    counts = await store.status_counts()
    assert counts[QUEUED] == 3 and counts[CANCELLED] == 1 and counts[RUNNING] == 0
    assert jobs[0].id not in {j.id for j in await store.active_jobs()}
    assert len(await store.active_jobs()) == 3


async def test_a_refused_change_leaves_the_job_as_it_was(make):
    store = make()
    created = await store.add_job(job())

    def refuse(j: Job) -> None:
        j.status = RUNNING
        raise policy.Conflict("no")

    with pytest.raises(policy.Conflict):
        await store.update_job(created.id, refuse)
    assert (await store.get_job(created.id)).status == QUEUED


async def test_concurrent_changes_all_apply_and_each_job_is_claimed_once(make):
    store, other = make(), make()  # two processes' stores over the same data
    counted = await store.add_job(job())

    def count(j: Job) -> None:
        j.attempts += 1

    await asyncio.gather(*(s.update_job(counted.id, count) for s in [store, other] * 10))
    assert (await store.get_job(counted.id)).attempts == 20
    await store.update_job(counted.id, lambda j: policy.cancel(j, time.time()))

    queued = [await store.add_job(job(tenant)) for tenant in ("acme", "globex", "initech")]
    claims = await asyncio.gather(
        *(claim_next(s, f"w{i}", 30.0, 0, time.time) for i, s in enumerate([store, other] * 4))
    )
    claimed = [(c.id, c.worker) for c, _ in claims if c is not None]
    assert sorted(job_id for job_id, _ in claimed) == sorted(j.id for j in queued)  # each exactly once
    for job_id, worker in claimed:
        assert (await store.get_job(job_id)).worker == worker


async def test_events_come_back_newest_first_and_page(make):
    store = make()
    created = await store.add_job(job())
    for i in range(5):
        await store.add_event(created.id, JobEvent(created_at=i, level="info", message=f"event {i}"))
    page = await store.list_events(created.id, None, 3)
    assert [e.message for e in page.items] == ["event 4", "event 3", "event 2"] and page.has_more
    older = await store.list_events(created.id, page.items[-1].seq, 3)
    assert [e.message for e in older.items] == ["event 1", "event 0"] and not older.has_more


async def test_a_new_store_over_the_same_data_sees_everything(make):
    store = make()
    file = await store.add_file(training_file(), b"rows")
    created = await store.add_job(job())
    await store.add_event(created.id, JobEvent(created_at=1, level="info", message="hello"))
    await store.note_start("acme", 12.5)
    again = make()
    assert (await again.get_file("acme", file.id)).id == file.id
    assert await again.read_file("acme", file.id) == b"rows"
    assert (await again.get_job(created.id, "acme")).status == QUEUED
    assert [e.message for e in (await again.list_events(created.id, None, 10)).items] == ["hello"]
    assert await again.last_starts() == {"acme": 12.5}

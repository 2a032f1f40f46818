"""The training worker in-process (`training.worker.Worker` over a `LocalJobStore`, the tiny GPT-2):
a worker told to stop checkpoints and re-queues its job and the next one resumes it, a job whose
worker vanished is taken back, and a free worker serves tenants in turn (fair share).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modeling.models import LoadedModel, load_model
from prefix_store.artifact import load_artifact
from prefix_store.jobs import policy
from prefix_store.jobs.base import artifact_path
from prefix_store.jobs.local import LocalJobStore
from prefix_store.jobs.model import (
    FILE_PREFIX,
    JOB_PREFIX,
    PAUSED,
    QUEUED,
    RUNNING,
    TRAINED,
    Job,
    TrainingFile,
    new_id,
)
from tests.fine_tuning.conftest import COLORS, colors_file, jsonl
from training.job_data import chat_template
from training.worker import Worker, WorkerConfig


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is faster on one thread of a loaded machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(peaked_gpt2_dir: Path) -> LoadedModel:
    return load_model(str(peaked_gpt2_dir), device="cpu")


async def queued_job(
    store: LocalJobStore,
    tenant: str = "acme",
    epochs: int = 1,
    every: int | None = None,
    data: bytes | None = None,
) -> Job:
    """A job past validation, as a replica leaves it for the workers."""
    data = data or colors_file()
    record = TrainingFile(new_id(FILE_PREFIX), tenant, "colors.jsonl", len(data), 0, "prompt_completion", 6)
    await store.add_file(record, data)
    hyper = {"n_epochs": epochs, "batch_size": 1, "learning_rate_multiplier": 10.0, "prefix_length": 4,
             "mlp_hidden": 32, "init": "random", "init_text": None, "placement": "paper", "checkpoint_every": every}  # fmt: skip
    job = Job(new_id(JOB_PREFIX), tenant, "tiny", record.id, "colors", int(time.time()), hyper, seed=1,
              status=QUEUED, queued_at=time.time())  # fmt: skip
    return await store.add_job(job)


async def until(store: LocalJobStore, job_id: str, check, timeout: float = 60.0) -> Job:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check(job := await store.get_job(job_id)):
        assert time.monotonic() < deadline, f"job {job_id}: {job.status} {job.phase}"
        await asyncio.sleep(0.02)
    return job


def worker(store: LocalJobStore, model: LoadedModel, name: str) -> Worker:
    return Worker(store, model, WorkerConfig(worker_id=name, lease_s=2.0, poll_s=0.05, report_every_s=0.0))


async def test_a_stopped_worker_requeues_its_job_and_the_next_resumes_it(model, tmp_path):
    store = LocalJobStore(tmp_path)
    job = await queued_job(store, epochs=30, every=10)
    stop = asyncio.Event()
    first = asyncio.create_task(worker(store, model, "first").run(stop))
    await until(store, job.id, lambda j: j.checkpoints)
    stop.set()  # what SIGTERM does
    await asyncio.wait_for(first, 30)
    requeued = await store.get_job(job.id)
    assert requeued.status == QUEUED and requeued.worker is None
    step = requeued.checkpoints[-1]["step"]
    assert 10 <= step < 180 and step == requeued.step  # it checkpointed where it stopped

    stop = asyncio.Event()
    second = asyncio.create_task(worker(store, model, "second").run(stop))
    done = await until(store, job.id, lambda j: j.phase == TRAINED)
    stop.set()
    await asyncio.wait_for(second, 30)
    assert done.status == RUNNING and done.step == 180 and done.attempts == 2
    assert artifact_path(store.data_dir, job.id).stat().st_size > 0  # for a serving replica to store
    messages = [e.message for e in (await store.list_events(job.id, None, 1000)).items]
    assert f"The worker is shutting down; back in the queue, it resumes from step {step}" in messages
    assert f"Resuming from the checkpoint at step {step} (attempt 2)" in messages


async def test_a_job_whose_worker_vanished_is_taken_back(model, tmp_path):
    store = LocalJobStore(tmp_path)
    job = await queued_job(store)

    def held_by_a_dead_worker(j: Job) -> None:
        j.status, j.worker, j.lease_until = RUNNING, "gone:1", time.time() - 1

    await store.update_job(job.id, held_by_a_dead_worker)
    stop = asyncio.Event()
    task = asyncio.create_task(worker(store, model, "alive").run(stop))
    done = await until(store, job.id, lambda j: j.phase == TRAINED)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert done.attempts == 1 and done.step == 6
    events = (await store.list_events(job.id, None, 1000)).items
    assert any(e.level == "warn" and "was lost" in e.message for e in events)


async def test_a_free_worker_takes_tenants_in_turn(model, tmp_path):
    store = LocalJobStore(tmp_path)
    acme = [await queued_job(store, "acme") for _ in range(3)]
    globex = await queued_job(store, "globex")  # queued last
    stop = asyncio.Event()
    task = asyncio.create_task(worker(store, model, "only").run(stop))
    for job in [*acme, globex]:
        await until(store, job.id, lambda j: j.phase == TRAINED)
    stop.set()
    await asyncio.wait_for(task, 30)
    order = sorted([await store.get_job(j.id) for j in [*acme, globex]], key=lambda j: j.started_at or 0)
    assert [j.tenant for j in order] == ["acme", "globex", "acme", "acme"]


async def test_a_chat_job_stores_the_template_of_its_sources(model, tmp_path):
    store = LocalJobStore(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in COLORS
    ]
    job = await queued_job(store, data=jsonl(rows))
    stop = asyncio.Event()
    task = asyncio.create_task(worker(store, model, "chat").run(stop))
    await until(store, job.id, lambda j: j.phase == TRAINED)
    stop.set()
    await asyncio.wait_for(task, 30)
    artifact = load_artifact(artifact_path(store.data_dir, job.id).read_bytes(), model.spec)
    assert artifact.metadata.training["chat_template"] == chat_template("<|endoftext|>")
    assert artifact.metadata.training["dataset"]["shape"] == "chat"


class _PausedAsItEnds(Worker):
    """A worker whose job is paused in the store just after its last step, before the heartbeat
    reads the job back: the race a pause sent near a job's end runs into."""

    async def _end(self, job: Job, change):  # type: ignore[no-untyped-def]
        if getattr(change, "__name__", "") == "trained":
            await self.store.update_job(job.id, policy.pause)
        return await super()._end(job, change)


async def test_a_pause_that_lands_as_training_ends_is_kept_and_resume_finishes(model, tmp_path):
    store = LocalJobStore(tmp_path)
    job = await queued_job(store, epochs=2, every=4)
    stop = asyncio.Event()
    first = asyncio.create_task(
        _PausedAsItEnds(store, model, WorkerConfig("first", 2.0, 0.05, 0.0)).run(stop)
    )
    messages: list[str] = []

    async def paused_event() -> bool:
        messages[:] = [e.message for e in (await store.list_events(job.id, None, 1000)).items]
        return any(m.startswith("Paused at step 12;") for m in messages)

    deadline = time.monotonic() + 60
    while not await paused_event():
        assert time.monotonic() < deadline, messages
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(first, 30)
    assert (await store.get_job(job.id)).status == PAUSED  # what its owner was told, not succeeded

    await store.update_job(job.id, lambda j: policy.resume(j, time.time()))
    stop = asyncio.Event()
    second = asyncio.create_task(worker(store, model, "second").run(stop))
    done = await until(store, job.id, lambda j: j.phase == TRAINED)
    stop.set()
    await asyncio.wait_for(second, 30)
    assert done.step == 12 and artifact_path(store.data_dir, job.id).stat().st_size > 0
    messages = [e.message for e in (await store.list_events(job.id, None, 1000)).items]
    assert "Resuming from the checkpoint at step 12 (attempt 2)" in messages

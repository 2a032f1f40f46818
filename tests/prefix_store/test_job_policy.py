"""The rules of a fine-tuning job's life (`prefix_store.jobs.policy`), on hand-made jobs: which queued
job a free worker takes (fair share across tenants), what cancel, pause and resume do in each state,
and when a worker's claim has lapsed."""

from __future__ import annotations

import pytest

from prefix_store.jobs import policy
from prefix_store.jobs.model import CANCELLED, PAUSED, QUEUED, RUNNING, SUCCEEDED, TRAINED, VALIDATING, Job


def job(name: str, tenant: str, status: str = QUEUED, queued_at: float = 0.0, **fields: object) -> Job:
    return Job(name, tenant, "m", "file-x", "t", 0, {}, 0, status=status, queued_at=queued_at, **fields)  # type: ignore[arg-type]


def test_a_tenant_with_fewer_running_jobs_goes_first():
    queued = [job("a2", "acme", queued_at=1), job("b1", "globex", queued_at=2)]
    running = [job("a1", "acme", RUNNING)]
    assert policy.pick_next(queued, running, {}).id == "b1"  # though acme's job waited longer


def test_ties_go_to_the_tenant_served_longest_ago_then_first_come():
    queued = [
        job("a2", "acme", queued_at=1),
        job("a3", "acme", queued_at=2),
        job("b1", "globex", queued_at=3),
    ]
    assert policy.pick_next(queued, [], {"acme": 10.0, "globex": 5.0}).id == "b1"
    assert policy.pick_next(queued, [], {"acme": 5.0, "globex": 10.0}).id == "a2"
    assert policy.pick_next(queued, [], {}).id == "a2"  # nobody served yet: the oldest job


def test_a_tenant_at_its_running_bound_waits():
    queued = [job("a2", "acme", queued_at=1)]
    running = [job("a1", "acme", RUNNING)]
    assert policy.pick_next(queued, running, {}, max_running_per_tenant=1) is None
    assert policy.pick_next(queued, running, {}, max_running_per_tenant=2).id == "a2"
    assert policy.pick_next([], [], {}) is None


def test_cancel_ends_unfinished_jobs_only():
    for status in (VALIDATING, QUEUED, RUNNING, PAUSED):
        j = job("j", "acme", status, worker="w", lease_until=5.0)
        policy.cancel(j, 100.0)
        assert (j.status, j.finished_at, j.worker) == (CANCELLED, 100, None)
        policy.cancel(j, 200.0)  # again: nothing changes
        assert j.finished_at == 100
    with pytest.raises(policy.Conflict, match="already succeeded"):
        policy.cancel(job("j", "acme", SUCCEEDED), 1.0)
    with pytest.raises(policy.Conflict, match="being stored"):
        policy.cancel(job("j", "acme", RUNNING, phase=TRAINED), 1.0)


def test_pause_and_resume():
    j = job("j", "acme", RUNNING, worker="w", lease_until=5.0)
    policy.pause(j)
    assert (j.status, j.worker) == (PAUSED, None)
    policy.resume(j, 50.0)
    assert (j.status, j.queued_at) == (QUEUED, 50.0)
    with pytest.raises(policy.Conflict, match="only a paused job"):
        policy.resume(j, 60.0)
    for status, phase in ((VALIDATING, None), (SUCCEEDED, None), (RUNNING, TRAINED)):
        with pytest.raises(policy.Conflict):
            policy.pause(job("j", "acme", status, phase=phase))


def test_a_lapsed_lease_means_a_lost_worker_but_a_trained_job_waits_for_a_replica():
    assert policy.lease_expired(job("j", "acme", RUNNING, lease_until=9.0), now=10.0)
    assert not policy.lease_expired(job("j", "acme", RUNNING, lease_until=11.0), now=10.0)
    assert not policy.lease_expired(job("j", "acme", RUNNING, lease_until=9.0, phase=TRAINED), now=10.0)
    assert not policy.lease_expired(job("j", "acme", QUEUED), now=10.0)


def test_estimated_finish_follows_this_attempts_pace():
    # resumed at step 100, 10 steps in 20 s: 2 s a step, 90 steps left
    assert (
        policy.estimated_finish(started_at=1000.0, step_at_start=100, step=110, total_steps=200, now=1020.0)
        == 1200
    )

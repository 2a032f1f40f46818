"""Fine-tuning in a fleet: two serving replicas and one training worker (`prefixserve train-worker`,
its own process), jobs in Redis (the suite's, on 127.0.0.1:6379, under a key prefix of this module's
own) and training files on a directory every process mounts (the shared volume of deploy/k8s).

A job created through replica A is seen and cancelled through replica B (and the worker stops);
a job created through A succeeds, and its task is served by both replicas.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from loadtest.process import ChildProcess, server_env
from tests.fine_tuning.conftest import EOS_TEXT, TERMINAL, colors_file, hyper, wait_for
from tests.reliability.conftest import KEYS, REPO_ROOT, START_TIMEOUT_S, ServerProcess

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "acme-manage-key"
MODEL = "tiny"


class Fleet:
    def __init__(self, model_dir: Path, work: Path) -> None:
        self.prefix = f"pstest-fleet-{uuid.uuid4().hex[:8]}"
        shared = {
            "redis_url": REDIS_URL,
            "redis_key_prefix": self.prefix,
            "fine_tuning_dir": str(work / "shared-volume"),
            "served_model_name": MODEL,
            "engine": "native",
            "train_workers": "0",  # the fleet's workers are their own processes (a Deployment)
            "training_lease_s": "3",
        }
        self.replicas = [ServerProcess(model_dir, work, **shared) for _ in range(2)]
        env = server_env({**shared, "model": str(model_dir), "device": "cpu", "api_keys": json.dumps(KEYS),
                          "log_format": "text"})  # fmt: skip
        env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        argv = [sys.executable, "-m", "prefixserve", "train-worker"]
        self.worker = ChildProcess(argv, work / "worker.log", env, cwd=REPO_ROOT)

    def start(self) -> Fleet:
        self.worker.start()
        for replica in self.replicas:
            replica.start(wait_ready=False)
        for replica in self.replicas:
            replica.wait_ready(START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        self.worker.stop(timeout_s=30)
        for replica in self.replicas:
            replica.stop()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()

    def sdk(self, replica: int) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.replicas[replica].url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def fleet(peaked_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    running = Fleet(peaked_gpt2_dir, tmp_path_factory.mktemp("fleet")).start()
    try:
        yield running
    finally:
        running.stop()


def test_a_job_created_on_one_replica_is_seen_and_cancelled_on_the_other(fleet):
    a, b = fleet.sdk(0), fleet.sdk(1)
    training_file = a.files.create(file=("colors.jsonl", colors_file()), purpose="fine-tune")
    assert b.files.retrieve(training_file.id).bytes == len(colors_file())
    job = a.fine_tuning.jobs.create(
        model=MODEL, training_file=training_file.id, suffix="never",
        method=hyper(n_epochs=100, batch_size=1, learning_rate_multiplier=10),
    )  # fmt: skip
    assert b.fine_tuning.jobs.retrieve(job.id).created_at == job.created_at
    wait_for(
        lambda: b.fine_tuning.jobs.retrieve(job.id).status == "running", 180, "the worker to start the job"
    )
    assert b.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert a.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    wait_for(lambda: any(e.message.startswith("Cancelled; training stopped") for e in a.fine_tuning.jobs.list_events(job.id)),
             10, "the worker to stop")  # fmt: skip
    for replica in fleet.replicas:
        response = httpx.get(f"{replica.url}/v1/prefixes/never", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 404


def test_a_job_created_on_one_replica_succeeds_and_both_serve_its_task(fleet):
    a, b = fleet.sdk(0), fleet.sdk(1)
    training_file = a.files.create(file=("colors.jsonl", colors_file()), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(
        model=MODEL, training_file=training_file.id, suffix="fleet-colors",
        method=hyper(n_epochs=3, learning_rate_multiplier=100),
    )  # fmt: skip
    done = wait_for(
        lambda: (j := b.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, 180, "the job to end"
    )
    assert done.status == "succeeded", done.error
    answers = []
    for sdk in (a, b):
        assert "fleet-colors" in {m.id for m in sdk.models.list()}
        served = sdk.completions.create(
            model="fleet-colors", prompt="red" + EOS_TEXT, max_tokens=6, temperature=0
        )
        answers.append(served.choices[0].text)
    base = (
        a.completions.create(model=MODEL, prompt="red" + EOS_TEXT, max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert answers[0] == answers[1]  # the same stored prefix on both replicas
    assert answers[0] != base  # and it is the task's, not the bare model's

"""Fine-tuning end to end on the embedded default: one `python -m server.main` process with a local
store and the training worker process it starts beside itself, driven by the real `openai` SDK.

One server for the module (a start costs ~20 s on the shared machine), so the tests run in order:
train a task and serve it (its output equals the training module's own check for that artifact),
cancel a running job, pause and resume one, the admin CLI, the metrics, and last a worker killed
mid-run followed by a server restart. Jobs train the tiny GPT-2 for a few hundred steps at most; the
worker's lease is 3 s so that a killed worker's job is taken back quickly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loadtest.process import ChildProcess
from modeling.models import LoadedModel, load_model
from prefix_store.artifact import load_artifact
from prefix_store.jobs.base import work_dir
from prefix_store.jobs.local import LocalJobStore
from prefix_store.local_store import LocalPrefixStore
from prefixserve.cli import main as prefixserve
from tests.fine_tuning.conftest import COLORS, EOS_TEXT, TERMINAL, colors_file, hyper, wait_for
from tests.reliability.conftest import ServerProcess
from training.evaluate import EvalConfig, generate_texts
from training.generation import causal_logits, greedy_causal

KEY = "acme-manage-key"
MODEL = "tiny"
MAX_TOKENS = 8
CLEAR_MARGIN = 1e-3  # logits; the server and the reference differ by ~1e-6 (float rounding)
LEASE_S = 3.0


class Embedded:
    """The module's server (replaced by the restart test) and what the tests share."""

    def __init__(self, model_dir: Path, work: Path) -> None:
        self.model_dir = model_dir
        self.work = work
        self.server = self.start()
        self.file_id = ""
        self.task = ""

    def start(self) -> ServerProcess:
        settings = {
            "local_store_dir": str(self.work / "store"),
            "served_model_name": MODEL,
            "engine": "native",
            "training_lease_s": str(LEASE_S),
        }
        return ServerProcess(self.model_dir, self.work, **settings).start()

    @property
    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=KEY, max_retries=0)

    @property
    def jobs_store(self) -> LocalJobStore:
        return LocalJobStore(self.work / "store" / ".fine-tuning")

    def work_dir(self, job_id: str) -> Path:
        return work_dir(self.work / "store" / ".fine-tuning", job_id)

    def job(self, job_id: str) -> Any:
        return self.sdk.fine_tuning.jobs.retrieve(job_id)

    def finished(self, job_id: str, timeout: float) -> Any:
        job = wait_for(
            lambda: (j := self.job(job_id)).status in TERMINAL and j, timeout, f"job {job_id} to end"
        )
        return job

    def events(self, job_id: str) -> list[Any]:
        return list(self.sdk.fine_tuning.jobs.list_events(job_id, limit=100))

    def worker_pid(self, job_id: str) -> int:
        worker = asyncio.run(self.jobs_store.get_job(job_id)).worker
        assert worker is not None, "the job has no worker"
        return int(worker.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def embedded(peaked_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    env = Embedded(peaked_gpt2_dir, tmp_path_factory.mktemp("embedded"))
    try:
        yield env
    finally:
        env.server.stop()


@pytest.fixture(scope="module")
def reference_model(peaked_gpt2_dir: Path) -> LoadedModel:
    return load_model(str(peaked_gpt2_dir), device="cpu")


def long_job(env: Embedded, suffix: str, epochs: int = 100, every: int = 20) -> str:
    """A job of `epochs` x 6 steps, long enough to act on while it runs."""
    job = env.sdk.fine_tuning.jobs.create(
        model=MODEL, training_file=env.file_id, suffix=suffix,
        method=hyper(n_epochs=epochs, batch_size=1, learning_rate_multiplier=10, checkpoint_every=every),
    )  # fmt: skip
    return str(job.id)


def reached_step(env: Embedded, job_id: str, step: int) -> bool:
    return any((e.data or {}).get("step", 0) >= step for e in env.events(job_id) if e.type == "metrics")


def test_sdk_trains_a_task_that_serves_the_training_modules_output(embedded, reference_model):
    sdk = embedded.sdk
    training_file = sdk.files.create(file=("colors.jsonl", colors_file()), purpose="fine-tune")
    embedded.file_id = training_file.id
    assert training_file.purpose == "fine-tune" and training_file.bytes == len(colors_file())
    job = sdk.fine_tuning.jobs.create(
        model=MODEL, training_file=training_file.id, validation_file=training_file.id, suffix="colors",
        method=hyper(n_epochs=3, learning_rate_multiplier=100, checkpoint_every=2),
    )  # fmt: skip
    assert job.status == "validating_files"
    job = embedded.finished(job.id, 180)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "colors" and job.trained_tokens > 0 and job.finished_at is not None
    embedded.task = job.fine_tuned_model

    events = embedded.events(job.id)
    assert any(e.type == "metrics" and e.data["train_loss"] is not None for e in events)
    assert any("valid_loss" in (e.data or {}) for e in events)  # the validation file was evaluated
    assert "version 1 of task 'colors'" in events[0].message
    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [9, 8, 6]  # the last three, newest first
    assert checkpoints[0].metrics.train_loss is not None
    assert not embedded.work_dir(job.id).exists()  # stored: its checkpoint files are deleted

    # The training module's own check of this artifact: `prefixserve eval`'s greedy generation from
    # the stored prefix (the reference forward, equal to PEFT's) against what the server serves.
    stored = asyncio.run(LocalPrefixStore(embedded.work / "store").get("acme", "colors"))
    artifact = load_artifact(stored.data, reference_model.spec)
    prompts = [source for source, _ in COLORS]
    config = EvalConfig(max_new_tokens=MAX_TOKENS, leading_space=False)
    expected = generate_texts(reference_model, artifact.prefixes, prompts, config)
    for prompt, want in zip(prompts, expected, strict=True):
        served = sdk.completions.create(
            model="colors", prompt=prompt + EOS_TEXT, max_tokens=MAX_TOKENS, temperature=0
        )
        text = served.choices[0].text.strip()
        # Compared up to the first step where the reference's top two logits are within float
        # rounding of each other (none, in practice): past such a tie either answer is right.
        decided = _decided_text(reference_model, artifact.prefixes["decoder"], prompt, want)
        assert text.startswith(decided), (prompt, text, want)
        if decided == want:
            assert text == want, (prompt, text, want)


def _decided_text(model: LoadedModel, prefix: Any, prompt: str, want: str) -> str:
    """The part of the reference's greedy answer whose every token won by more than `CLEAR_MARGIN`."""
    tokenizer, eos = model.tokenizer, model.tokenizer.eos_token_id
    prompt_ids = [*tokenizer(prompt, add_special_tokens=False)["input_ids"], eos]
    ids = greedy_causal(model.model, prefix, [prompt_ids], MAX_TOKENS, eos)[0]
    assert tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip() == want
    logits = causal_logits(model.model, prefix, [prompt_ids + ids[:k] for k in range(len(ids))])  # [N, V]
    top2 = logits.topk(2, dim=-1).values.tolist()  # [N, 2]
    decided = next((k for k, (first, second) in enumerate(top2) if first - second <= CLEAR_MARGIN), len(ids))
    return want if decided == len(ids) else tokenizer.decode([t for t in ids[:decided] if t != eos]).strip()


def test_cancel_mid_run_stops_the_worker_within_seconds_and_stores_nothing(embedded, monkeypatch, capsys):
    job_id = long_job(embedded, "cancelled-task")
    wait_for(lambda: reached_step(embedded, job_id, 3), 120, "the job to train a few steps")
    monkeypatch.setenv("PREFIXSERVE_API_KEY", KEY)
    monkeypatch.setenv("PREFIXSERVE_SERVER", embedded.server.url)
    asked = time.monotonic()
    assert prefixserve(["jobs", "cancel", job_id, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    stopped = wait_for(
        lambda: next((e for e in embedded.events(job_id) if e.message.startswith("Cancelled; training stopped")), None),
        10, "the worker to stop",
    )  # fmt: skip
    assert time.monotonic() - asked < 8
    time.sleep(LEASE_S)  # nothing more from the worker: its last word was the stop
    assert embedded.events(job_id)[0].id == stopped.id
    job = embedded.job(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert not embedded.work_dir(job_id).exists()
    missing = httpx.get(
        f"{embedded.server.url}/v1/prefixes/cancelled-task", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert missing.status_code == 404


def test_pause_checkpoints_and_resume_continues_from_it(embedded):
    sdk = embedded.sdk
    job_id = long_job(embedded, "paused-task", epochs=20, every=10)
    wait_for(lambda: reached_step(embedded, job_id, 12), 120, "a checkpoint")
    assert sdk.fine_tuning.jobs.pause(job_id).status == "paused"
    paused = wait_for(lambda: next((e for e in embedded.events(job_id) if e.message.startswith("Paused at step")), None),
                      60, "the worker to pause")  # fmt: skip
    step = int(paused.message.split()[3].rstrip(";"))
    assert sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    assert embedded.finished(job_id, 120).status == "succeeded"
    assert any(
        e.message.startswith(f"Resuming from the checkpoint at step {step}") for e in embedded.events(job_id)
    )


def test_jobs_cli_lists_shows_and_prints_events(embedded, monkeypatch, capsys):
    monkeypatch.setenv("PREFIXSERVE_API_KEY", KEY)
    monkeypatch.setenv("PREFIXSERVE_SERVER", embedded.server.url)
    assert prefixserve(["jobs", "list", "-o", "json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    by_suffix = {j["user_provided_suffix"]: j for j in jobs}
    assert (
        by_suffix["colors"]["status"] == "succeeded" and by_suffix["cancelled-task"]["status"] == "cancelled"
    )
    assert prefixserve(["jobs", "show", by_suffix["colors"]["id"]]) == 0
    shown = capsys.readouterr().out
    assert "succeeded" in shown and "prefix_length=4" in shown
    assert prefixserve(["jobs", "events", by_suffix["colors"]["id"]]) == 0
    assert "version 1 of task 'colors'" in capsys.readouterr().out
    assert prefixserve(["jobs", "cancel", by_suffix["colors"]["id"]]) == 1  # finished: 409
    assert "HTTP 409" in capsys.readouterr().err


def test_metrics_count_jobs_by_status_and_trained_tokens(embedded):
    def samples() -> dict[str, float]:
        text = httpx.get(f"{embedded.server.url}/metrics").text
        lines = [
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("prefixserve_fine_tuning")
        ]
        return {name: float(value) for name, value in lines}

    # The gauges follow the job store once a second: the last job ended moments ago.
    found = wait_for(lambda: (s := samples())['prefixserve_fine_tuning_jobs{status="succeeded"}'] >= 2 and s,
                     60, "the gauges to count the finished jobs")  # fmt: skip
    assert found['prefixserve_fine_tuning_jobs{status="cancelled"}'] >= 1
    assert found['prefixserve_fine_tuning_jobs{status="running"}'] == 0
    assert found["prefixserve_fine_tuning_queue_length"] == 0
    assert found["prefixserve_fine_tuning_trained_tokens_total"] > 0


def test_a_killed_worker_and_a_server_restart_lose_no_job_or_file(embedded):
    """SIGKILL the worker mid-run, then restart the server (SIGTERM, start again on the same store):
    every file and job is still there, and the killed worker's job, whose lease ran out, resumes from
    its last checkpoint on the new server's worker and succeeds."""
    sdk = embedded.sdk
    job_id = long_job(embedded, "survivor", epochs=40, every=20)
    wait_for(lambda: list(sdk.fine_tuning.jobs.checkpoints.list(job_id)), 120, "a checkpoint", interval=0.1)
    os.kill(embedded.worker_pid(job_id), signal.SIGKILL)
    assert embedded.job(job_id).status == "running"  # killed mid-run, not after the end
    files_before = [f.id for f in sdk.files.list()]
    jobs_before = {j.id: j.status for j in sdk.fine_tuning.jobs.list(limit=100)}
    assert ChildProcess.stop(embedded.server, timeout_s=60) == 0  # SIGTERM: drained, exit 0

    embedded.server = embedded.start()
    sdk = embedded.sdk
    assert [f.id for f in sdk.files.list()] == files_before
    assert sdk.files.content(embedded.file_id).read() == colors_file()
    jobs_after = {j.id: j.status for j in sdk.fine_tuning.jobs.list(limit=100)}
    assert set(jobs_after) == set(jobs_before)
    assert {k: v for k, v in jobs_after.items() if v in TERMINAL} == {
        k: v for k, v in jobs_before.items() if v in TERMINAL
    }
    job = embedded.finished(job_id, 240)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in embedded.events(job_id)]
    assert any("was lost" in m for m in messages)
    resumed = [m for m in messages if m.startswith("Resuming from the checkpoint at step")]
    assert resumed and int(resumed[-1].split()[6]) >= 20
    served = sdk.completions.create(model="survivor", prompt="red" + EOS_TEXT, max_tokens=2, temperature=0)
    assert served.model == "survivor"
    assert (
        sdk.completions.create(model=embedded.task, prompt="red" + EOS_TEXT, max_tokens=2).model
        == embedded.task
    )

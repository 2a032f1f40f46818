"""The training worker (`prefixserve train-worker`): claims queued fine-tuning jobs and trains them.

Runs outside every serving process (a process beside an embedded server, or its own Deployment in a
fleet). It loads the base model once, then loops: take the next job (`claim_next`: fair share across
tenants, lost jobs back to the queue), train it on the recipe (`training.job_run`) in a thread while
the event loop renews the job's lease, and leave the trained artifact in the job's work directory with
the job marked `trained`: a serving replica stores it as the task's new version (through the upload
checks every artifact passes) and marks the job succeeded. A worker never writes the prefix store.

What the worker reports: events (start or resume, a metrics event per step at most every
`report_every_s`, each checkpoint, the end), the job's progress (`step`, `estimated_finish`) and its
checkpoints. At every lease renewal it reads the job back: cancelled means stop now (nothing is
stored), paused means checkpoint and stop, another worker holding it means stop. On SIGTERM it
checkpoints, puts the job back in the queue and exits; if it is killed instead, its lease runs out and
the next worker resumes the job from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeling.models import LoadedModel
from prefix_store.base import StoreUnavailable
from prefix_store.jobs import policy
from prefix_store.jobs.base import JobNotFound, JobStore, artifact_path, claim_next, remove_work, work_dir
from prefix_store.jobs.files import write_atomic
from prefix_store.jobs.model import PAUSED, RUNNING, TRAINED, Job, JobEvent
from training.job_data import DataFileError, parse_file
from training.job_run import KEEP_CHECKPOINTS, JobData, run_job
from training.trainer import TrainingStopped, TrainState, list_checkpoints

logger = logging.getLogger("prefixserve.worker")

MAX_METRICS_EVENTS = 1000


@dataclass(frozen=True)
class WorkerConfig:
    """How one worker behaves (`prefixserve train-worker` builds it from the settings)."""

    worker_id: str
    lease_s: float = 30.0  # a job whose worker has not renewed its claim for this long is re-queued
    poll_s: float = 1.0  # how often an idle worker looks for a job
    report_every_s: float = 1.0  # metrics events at most this often (and at every checkpoint)
    max_running_per_tenant: int = 0  # `Limits.tenant_max_running_jobs` (0: no bound)
    idle_exit_s: float | None = None  # return from `run` after this long without a job (None: never)


class _Run:
    """What the training thread and the event loop share about the job being trained."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.signal: str | None = None  # "stop" | "checkpoint", set by the loop, read by the thread
        self.why = ""
        self.step = job.step
        self.total_steps = job.total_steps
        self.started = time.time()
        self.step_at_start = job.step
        self.lock = threading.Lock()

    def ask(self, signal: str, why: str) -> None:
        with self.lock:
            if self.signal != "stop":  # stopping now wins over checkpointing first
                self.signal, self.why = signal, why


class Worker:
    """One training worker over `store`, with the base model `loaded` (module docstring)."""

    def __init__(
        self,
        store: JobStore,
        loaded: LoadedModel,
        config: WorkerConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.loaded = loaded
        self.config = config
        self.clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and train jobs until `stop` is set (the job in hand is checkpointed and re-queued)."""
        self._loop = asyncio.get_running_loop()
        idle_since = time.monotonic()
        while not stop.is_set():
            try:
                job, lost = await claim_next(
                    self.store, self.config.worker_id, self.config.lease_s,
                    self.config.max_running_per_tenant, self.clock,
                )  # fmt: skip
            except StoreUnavailable as exc:
                logger.warning("job store unavailable: %s", exc)
                job, lost = None, []
            for requeued in lost:
                await self._event(
                    requeued, f"The worker training this job was lost; back in the queue, it resumes from "
                    f"step {_checkpoint_step(work_dir(self.store.data_dir, requeued.id))}", level="warn",
                )  # fmt: skip
            if job is None:
                if (
                    self.config.idle_exit_s is not None
                    and time.monotonic() - idle_since > self.config.idle_exit_s
                ):
                    logger.info("no job for %.0f s; exiting", self.config.idle_exit_s)
                    return
                await _sleep_or_stop(stop, self.config.poll_s)
                continue
            try:
                await self.train(job, stop)
            except StoreUnavailable as exc:  # its lease lapses; this or another worker resumes it
                logger.warning("job store unavailable while handling %s: %s", job.id, exc)
            idle_since = time.monotonic()

    async def train(self, job: Job, stop: asyncio.Event) -> None:
        """Train one claimed job to its end, or until it is cancelled, paused, lost or `stop` is set."""
        run = _Run(job)
        try:
            data = await self._read_data(job)
        except (DataFileError, JobNotFound, KeyError, OSError) as exc:
            message = str(exc)
            await self._end(
                job, lambda j: j.fail("invalid_training_file", message, "training_file", self.clock())
            )
            return
        work = work_dir(self.store.data_dir, job.id)
        resumed = _checkpoint_step(work)
        await self._event(
            job, f"Resuming from the checkpoint at step {resumed} (attempt {job.attempts})"
            if resumed else f"Fine-tuning started: {len(data.train)} training examples", data={"step": resumed},
        )  # fmt: skip
        heartbeat = asyncio.create_task(self._heartbeat(run, stop))
        try:
            outcome = await asyncio.to_thread(run_job, self.loaded, job, data, work, self._hook(run))
        except TrainingStopped as stopped:
            await self._stopped(run, stopped)
            return
        except Exception as exc:  # the recipe failed on this job: the job fails, the worker goes on
            logger.exception("job %s failed", job.id)
            message = f"training failed: {type(exc).__name__}: {exc}"[:500]
            if await self._end(job, lambda j: j.fail("training_error", message, None, self.clock())):
                await asyncio.to_thread(remove_work, self.store.data_dir, job.id)
            return
        finally:
            heartbeat.cancel()
        await asyncio.to_thread(write_atomic, artifact_path(self.store.data_dir, job.id), outcome.artifact)

        def trained(j: Job) -> None:
            _still_mine(j, self.config.worker_id)
            j.phase = TRAINED
            j.trained_tokens = outcome.trained_tokens
            j.step = outcome.steps
            j.estimated_finish = None

        if await self._end(job, trained):
            await self._event(
                job, "Training finished; storing the prefix as the task's new version",
                kind="metrics", data={"step": outcome.steps, "train_loss": outcome.train_loss,
                                      "full_valid_loss": outcome.valid_loss, "total_steps": outcome.steps},
            )  # fmt: skip
        elif await self._status(job) == PAUSED:
            # The pause reached the store after the last step, before the heartbeat saw it: the job
            # stays paused as its owner was told, and resume continues from the latest checkpoint.
            step = _checkpoint_step(work)
            await self._event(
                job, f"Paused at step {step}; the pause came as training ended, resume continues from "
                f"the checkpoint at step {step}",
            )  # fmt: skip

    async def _read_data(self, job: Job) -> JobData:
        async def examples(file_id: str) -> tuple[Any, list[Any]]:
            record = await self.store.get_file(job.tenant, file_id)
            return parse_file(await self.store.read_file(job.tenant, file_id), record.filename)

        shape, train = await examples(job.training_file)
        valid = (await examples(job.validation_file))[1] if job.validation_file else []
        return JobData(shape, train, valid)

    def _hook(self, run: _Run) -> Callable[[TrainState, int, Path | None], str | None]:
        """The training thread's per-step hook: report, and say whether to stop."""
        last_report = [0.0]

        def on_step(state: TrainState, total_steps: int, checkpoint: Path | None) -> str | None:
            with run.lock:
                run.step, run.total_steps = state.step, total_steps
                signal = run.signal
            now = time.monotonic()
            # At most ~MAX_METRICS_EVENTS per job, and one a second: a long job's log stays small.
            spaced = state.step % max(1, total_steps // MAX_METRICS_EVENTS) == 0
            due = spaced and now - last_report[0] >= self.config.report_every_s
            if checkpoint is not None or due or state.step == total_steps:
                last_report[0] = now
                self._from_thread(self._report(run, state, total_steps, checkpoint))
            return signal

        return on_step

    async def _report(self, run: _Run, state: TrainState, total_steps: int, checkpoint: Path | None) -> None:
        metrics = _metrics(state, total_steps)
        await self._event(run.job, f"Step {state.step}/{total_steps}: training loss={metrics['train_loss']:.4f}",
                          kind="metrics", data=metrics)  # fmt: skip
        if checkpoint is not None:
            await self._checkpointed(run, metrics)

    async def _checkpointed(self, run: _Run, metrics: dict[str, Any]) -> None:
        """List a checkpoint in the job (its last `KEEP_CHECKPOINTS`, as the work directory keeps)."""
        step = int(metrics["step"])
        record = {"step": step, "created_at": int(self.clock()), "metrics": metrics}

        def add(j: Job) -> None:
            if j.terminal:  # a paused job still gets the checkpoint it stopped at
                raise policy.Conflict(f"job {j.status}")
            kept = [c for c in j.checkpoints if int(c["step"]) != step]
            j.checkpoints = sorted([*kept, record], key=lambda c: int(c["step"]))[-KEEP_CHECKPOINTS:]
            j.step = max(j.step, step)

        try:
            await self.store.update_job(run.job.id, add)
        except policy.Conflict:
            return
        await self._event(run.job, f"Checkpoint saved at step {step}", data={"step": step})

    async def _heartbeat(self, run: _Run, stop: asyncio.Event) -> None:
        """Renew the lease and read the job back, often enough that a cancel stops it within seconds."""
        interval = min(1.0, self.config.lease_s / 3)
        while True:
            if stop.is_set():
                run.ask("checkpoint", "shutdown")

            def renew(j: Job) -> None:
                _still_mine(j, self.config.worker_id)
                j.lease_until = self.clock() + self.config.lease_s
                with run.lock:
                    j.step, j.total_steps = run.step, run.total_steps
                if run.total_steps:
                    j.estimated_finish = policy.estimated_finish(
                        run.started, run.step_at_start, run.step, run.total_steps, self.clock()
                    )

            try:
                await self.store.update_job(run.job.id, renew)
            except policy.Conflict:
                with contextlib.suppress(StoreUnavailable):  # if so, the next renewal asks again
                    current = await self.store.get_job(run.job.id)
                    if current.status == PAUSED:
                        run.ask("checkpoint", "paused")
                    else:
                        run.ask("stop", current.status if current.status != RUNNING else "lost")
            except StoreUnavailable as exc:
                logger.warning("could not renew the lease of %s: %s", run.job.id, exc)
            await asyncio.sleep(interval)

    async def _stopped(self, run: _Run, stopped: TrainingStopped) -> None:
        step = stopped.state.step
        if stopped.checkpoint is not None:  # saved on the way out (pause, shutdown): resume starts here
            await self._checkpointed(run, _metrics(stopped.state, run.total_steps or step))
        if run.why == "shutdown":

            def back(j: Job) -> None:
                _still_mine(j, self.config.worker_id)
                policy.requeue(j, self.clock())
                j.step = step

            if await self._end(run.job, back):
                await self._event(
                    run.job, f"The worker is shutting down; back in the queue, it resumes from step {step}"
                )
        elif run.why == "paused":
            await self._event(
                run.job, f"Paused at step {step}; a checkpoint was saved, resume continues from it"
            )
        elif run.why == "cancelled":
            await asyncio.to_thread(remove_work, self.store.data_dir, run.job.id)
            await self._event(run.job, f"Cancelled; training stopped at step {step}, nothing was stored")

    async def _status(self, job: Job) -> str | None:
        """The job's status as the store has it now (None when the store cannot say)."""
        try:
            return (await self.store.get_job(job.id)).status
        except (StoreUnavailable, JobNotFound):
            return None

    async def _end(self, job: Job, change: Callable[[Job], None]) -> bool:
        """Apply the last change of this worker's hold on `job`; False when it is no longer ours."""
        try:
            await self.store.update_job(job.id, change)
            return True
        except policy.Conflict:
            return False

    async def _event(
        self,
        job: Job,
        message: str,
        level: str = "info",
        kind: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        event = JobEvent(created_at=int(self.clock()), level=level, message=message, type=kind, data=data)
        try:
            await self.store.add_event(job.id, event)
        except StoreUnavailable as exc:
            logger.warning("could not record an event of %s: %s", job.id, exc)

    def _from_thread(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on the worker's event loop and wait for it (reports keep their order)."""
        assert self._loop is not None
        try:
            asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=max(self.config.lease_s, 5.0))
        except Exception:  # a report that fails must not fail the training
            logger.warning("could not report progress", exc_info=True)


def _still_mine(job: Job, worker: str) -> None:
    if job.status != RUNNING or job.worker != worker or job.phase is not None:
        raise policy.Conflict(f"job is {job.status}, held by {job.worker}")


def _checkpoint_step(work: Path) -> int:
    """The step of the latest checkpoint in a job's work directory (0: none; it starts afresh)."""
    found = list_checkpoints(work)
    return int(found[-1].name.removeprefix("step-")) if found else 0


def _metrics(state: TrainState, total_steps: int) -> dict[str, Any]:
    """A step's metrics as events and checkpoints report them."""
    metrics: dict[str, Any] = {
        "step": state.step,
        "total_steps": total_steps,
        "train_loss": state.train_losses[-1][1] if state.train_losses else None,
        "tokens_per_second": round(state.num_tokens / max(state.train_seconds, 1e-9), 1),
        "trained_tokens": state.num_tokens,
    }
    if state.dev_losses and state.dev_losses[-1][0] == state.step:
        metrics["valid_loss"] = state.dev_losses[-1][1]
    return metrics


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

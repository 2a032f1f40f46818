"""The `validating_files` stage: a new job's files checked against the recipe and the model.

Each file is parsed as a training file (`training.job_data`), every example's tokens are counted as
the recipe will encode them (truncated, with separators), and each must fit the model's positions
after the job's prefix; the validation file must have the training file's shape; the training tokens
(tokens x epochs) must be within `max_training_tokens_per_job`. The first problem fails the job with
OpenAI's error object naming the file (`param`) and the line; otherwise the job is queued with its
number of steps. Tokenising runs in a thread; the serving event loop is never blocked by it.

A replica validates the jobs it creates at once; its background loop also validates jobs left in
`validating_files` by a replica that stopped meanwhile (`publisher.run`). Two replicas validating
one job is harmless: only the first to move it out of `validating_files` does.
"""

from __future__ import annotations

import logging

import anyio

from prefix_store.base import StoreUnavailable
from prefix_store.jobs import policy
from prefix_store.jobs.base import JobNotFound
from prefix_store.jobs.model import QUEUED, VALIDATING, Job
from server.api.fine_tuning.service import FineTuning
from training.job_data import DataFileError, Shape, count_training_tokens, parse_file, steps_per_epoch

logger = logging.getLogger(__name__)


async def validate(service: FineTuning, job_id: str) -> None:
    """Check a `validating_files` job's files; queue it or fail it (module docstring)."""
    if job_id in service.validating:
        return
    service.validating.add(job_id)
    try:
        job = await service.store.get_job(job_id)
        if job.status != VALIDATING:
            return
        try:
            tokens, examples = await _check_files(service, job)
        except DataFileError as exc:
            code, message, param = exc.code, str(exc), getattr(exc, "param", "training_file")

            def failed(j: Job) -> None:
                j.fail(code, message, param, service.clock())

            await service.conclude(job.id, _validating, failed, f"Validation failed: {message}", "error")
            return
        hyper = job.hyperparameters
        total_steps = int(hyper["n_epochs"]) * steps_per_epoch(examples, int(hyper["batch_size"]))

        def queue(j: Job) -> None:
            j.status, j.queued_at, j.total_steps = QUEUED, service.clock(), total_steps

        validated = (
            f"Files validated: {examples} training examples, {tokens} training tokens over "
            f"{hyper['n_epochs']} epochs ({total_steps} steps); the job is queued"
        )
        await service.conclude(job.id, _validating, queue, validated)
    except StoreUnavailable as exc:  # the job stays in validating_files; the background loop retries
        logger.warning("could not validate job %s: %s", job_id, exc)
    finally:
        service.validating.discard(job_id)


class _FileProblem(DataFileError):
    def __init__(self, error: DataFileError, param: str, what: str) -> None:
        super().__init__(f"{what}: {error}", None, error.code)
        self.param = param


async def _check_files(service: FineTuning, job: Job) -> tuple[int, int]:
    """(training tokens over all epochs, training examples); raises `DataFileError` with `param`."""
    prefix_length = int(job.hyperparameters["prefix_length"])
    shapes: list[Shape] = []
    counts: list[tuple[int, int]] = []
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if file_id is None:
            continue
        try:
            record = await service.store.get_file(job.tenant, file_id)
            data = await service.store.read_file(job.tenant, file_id)
            shape, examples = await anyio.to_thread.run_sync(parse_file, data, record.filename)
            if shapes and shape is not shapes[0]:
                raise DataFileError(f"its lines are {shape.name}, the training file's {shapes[0].name}")
            tokens = await anyio.to_thread.run_sync(
                count_training_tokens,
                examples,
                shape,
                service.count_tokens,
                service.model_shape,
                prefix_length,
            )
        except JobNotFound:
            raise _FileProblem(DataFileError("the file was deleted"), param, f"{param} {file_id}") from None
        except DataFileError as exc:
            raise _FileProblem(exc, param, f"{param} {file_id}") from None
        shapes.append(shape)
        counts.append((tokens, len(examples)))
    tokens, num_examples = counts[0]
    total = tokens * int(job.hyperparameters["n_epochs"])
    limit = service.state.config.limits.max_training_tokens_per_job
    if total > limit:
        problem = DataFileError(
            f"the job would train on {total} tokens ({tokens} per epoch x {job.hyperparameters['n_epochs']} "
            f"epochs); the limit per job is {limit}",
            code="exceeded_token_limit",
        )
        raise _FileProblem(problem, "training_file", f"training_file {job.training_file}")
    return total, num_examples


def _validating(j: Job) -> None:
    if j.status != VALIDATING:  # cancelled meanwhile, or another replica finished first
        raise policy.Conflict(j.status)

"""Creating a fine-tuning job, and the user's changes to one (cancel, pause, resume).

`create` checks what needs no file contents and answers at once: the body's fields (400 naming the
`param`), the base model (the one this server serves), the task name the suffix gives, the prefix
settings against the model, the files (the tenant's own: else 404) and the tenant's queue
(`tenant_max_queued_jobs`: 429). The job is then stored in `validating_files` and its files are
checked in the background (`validation.validate`): a bad line or too many tokens fails the job there,
with the line and the reason, and nothing is trained or stored.
"""

from __future__ import annotations

from typing import Any

import anyio
from pydantic import ValidationError

from prefix_store.base import InvalidName
from prefix_store.jobs import policy
from prefix_store.jobs.base import JobNotFound, remove_work
from prefix_store.jobs.model import JOB_PREFIX, WAITING, Job, new_id
from server.api.errors import ApiError
from server.api.fine_tuning.schemas import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_MLP_HIDDEN,
    Hyperparameters,
    JobCreate,
)
from server.api.fine_tuning.service import FineTuning, api_errors
from server.api.fine_tuning.validation import validate
from server.api.prefix_admin import check_task_name
from server.api.quotas import QuotaExceeded

HYPER = "method.supervised.hyperparameters"
# What "auto" and an absent extra mean: the paper's defaults (docs/method.md).
DEFAULTS: dict[str, Any] = {
    "n_epochs": 10,
    "batch_size": 5,
    "learning_rate_multiplier": 1.0,
    "prefix_length": 10,
    "mlp_hidden": 512,
    "placement": "paper",
}


def bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


def parse_body(body: Any) -> JobCreate:
    """The request as `JobCreate`; 400 naming the first bad field as OpenAI's `param`."""
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        raise bad(f"{param}: {error['msg']}" if param else error["msg"], param) from None


def resolve_hyperparameters(service: FineTuning, request: JobCreate) -> dict[str, Any]:
    """Every hyperparameter with its default filled in, each checked against its range and the model."""
    nested = request.method.supervised if request.method and request.method.supervised else None
    given = nested.hyperparameters if nested else None
    if given is not None and request.hyperparameters is not None:
        raise bad("give hyperparameters in method.supervised.hyperparameters or at the top level, not both",
                  "hyperparameters")  # fmt: skip
    raw = (given or request.hyperparameters or Hyperparameters.model_validate({})).model_dump()
    hyper: dict[str, Any] = {k: (DEFAULTS.get(k) if v in (None, "auto") else v) for k, v in raw.items()}
    spec, limits = service.state.spec, service.state.config.limits
    longest_prefix = min(limits.max_prefix_length, spec.max_positions - 2)
    bounds = {
        "n_epochs": (1, MAX_EPOCHS),
        "batch_size": (1, MAX_BATCH_SIZE),
        "prefix_length": (1, longest_prefix),
        "mlp_hidden": (1, MAX_MLP_HIDDEN),
    }
    for name, (low, high) in bounds.items():
        if not low <= hyper[name] <= high:
            raise bad(f"{name} must be {low}..{high} for this model, got {hyper[name]}", f"{HYPER}.{name}")
    if not 0 < hyper["learning_rate_multiplier"] <= 100:
        raise bad("learning_rate_multiplier must be in (0, 100]", f"{HYPER}.learning_rate_multiplier")
    if hyper["init"] is None:
        hyper["init"] = "text-fit" if hyper["init_text"] else "random"
    if (hyper["init"] == "text-fit") != bool(hyper["init_text"]):
        raise bad("init text-fit needs init_text, and init_text needs init text-fit", f"{HYPER}.init_text")
    if raw["placement"] is not None and not spec.is_encoder_decoder:
        raise bad("placement applies to encoder-decoder (BART) models only", f"{HYPER}.placement")
    return hyper


def task_name(service: FineTuning, request: JobCreate, job_id: str) -> str:
    """The task the job's prefix is stored under: the suffix (a new version if it exists), else one
    named after the job."""
    name = request.suffix if request.suffix is not None else f"ft-{job_id.removeprefix(JOB_PREFIX)[:12]}"
    try:
        check_task_name(service.state, name)
    except (InvalidName, ApiError) as exc:
        raise bad(f"suffix: {getattr(exc, 'detail', exc)}", "suffix") from None
    return name


async def create(service: FineTuning, tenant: str, body: Any) -> Job:
    """Check and store a new job, and start checking its files (module docstring)."""
    request = parse_body(body)
    if request.model != service.state.config.model_id:
        raise bad(f"unknown base model {request.model!r}: this server fine-tunes {service.state.config.model_id!r}",
                  "model")  # fmt: skip
    hyper = resolve_hyperparameters(service, request)
    job_id = new_id(JOB_PREFIX)
    task = task_name(service, request, job_id)
    store = service.store
    for param, file_id in (
        ("training_file", request.training_file),
        ("validation_file", request.validation_file),
    ):
        if file_id is None:
            continue
        try:
            await store.get_file(tenant, file_id)
        except JobNotFound:
            raise ApiError(404, f"{param}: no file {file_id!r}", "not_found", param=param) from None
    waiting = [j for j in await store.active_jobs() if j.tenant == tenant and j.status in WAITING]
    quota = service.state.config.limits.tenant_max_queued_jobs
    if quota > 0 and len(waiting) >= quota:
        raise QuotaExceeded(429, f"the tenant has {len(waiting)} jobs waiting for a worker, its quota: "
                                 "wait for one to start or cancel one")  # fmt: skip
    job = Job(
        id=job_id,
        tenant=tenant,
        model=request.model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        task=task,
        created_at=int(service.clock()),
        hyperparameters=hyper,
        seed=request.seed if request.seed is not None else 42,
        suffix=request.suffix,
        metadata=request.metadata,
    )
    job = await store.add_job(job)
    await service.event(job.id, f"Created fine-tuning job {job.id}; validating the training files")
    service.spawn(validate(service, job.id), f"validate-{job.id}")
    return job


async def change(service: FineTuning, tenant: str, job_id: str, action: str) -> Job:
    """Cancel, pause or resume the tenant's job (`policy`): 404 another tenant's, 409 when the job's
    state does not allow it."""
    with api_errors():
        before = await service.store.get_job(job_id, tenant)
        now = service.clock
        apply = {
            "cancel": lambda job: policy.cancel(job, now()),
            "pause": policy.pause,
            "resume": lambda job: policy.resume(job, now()),
        }[action]
        job = await service.store.update_job(job_id, apply)
    messages = {
        "cancel": "Job cancelled: training stops, nothing is stored",
        "pause": "Job paused: a running job stops at its next step with a checkpoint",
        "resume": "Job resumed: back in the queue, it continues from its last checkpoint",
    }
    await service.event(job_id, messages[action])
    if action == "cancel" and before.worker is None and not before.terminal:
        # No worker holds it (queued, paused): nobody else will clear its checkpoints.
        await anyio.to_thread.run_sync(remove_work, service.store.data_dir, job_id)
    return job

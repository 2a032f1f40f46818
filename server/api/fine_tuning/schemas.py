"""Bodies of the OpenAI-shaped `/v1/files` and `/v1/fine_tuning/jobs` routes (what the `openai` SDK
sends and parses), and the mapping from the stored records (`prefix_store.jobs.model`) to them.

A job's request is checked here (`JobCreate`): unknown fields are refused, not ignored, so a typo
in a hyperparameter is never trained with silently. Prefix tuning's own settings are extra
hyperparameters beside OpenAI's three (`Hyperparameters`); their ranges are checked again against
the served model when the job is created.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from prefix_store.jobs.model import Job, JobEvent, TrainingFile

Auto = Literal["auto"]
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 256
MAX_MLP_HIDDEN = 8192
MAX_INIT_TEXT_CHARS = 256
MAX_METADATA_KEYS = 16  # OpenAI's metadata rules
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """OpenAI's three, and prefix tuning's (docs/training.md, "Jobs through the API")."""

    n_epochs: int | Auto = Field("auto", description="Epochs; auto: 10 (the paper's default).")
    batch_size: int | Auto = Field("auto", description="Examples per optimizer step; auto: 5.")
    learning_rate_multiplier: float | Auto = Field("auto", description="Times the paper's 5e-5; auto: 1.")
    prefix_length: int | None = Field(None, description="Prefix length L (1..MAX_PREFIX_LENGTH); default 10.")
    mlp_hidden: int | None = Field(
        None, description="Width k of the reparameterisation MLP P = MLP(P'); default 512."
    )
    init: Literal["random", "text-fit"] | None = Field(
        None, description="Prefix initialisation: random, or fitted to the activations of `init_text`."
    )
    init_text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_INIT_TEXT_CHARS)] | None = None
    placement: Literal["paper", "peft"] | None = Field(
        None, description="BART: paper = encoder, decoder and cross-attention prefixes; peft = decoder only."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Optimizer steps between checkpoints; default: each epoch."
    )


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class JobCreate(_Strict):
    """`POST /v1/fine_tuning/jobs`."""

    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, max_length=64, description="The task's name (`fine_tuned_model`).")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetaKey, MetaValue] | None = Field(None, max_length=MAX_METADATA_KEYS)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI: use `method`.")
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported (none allowed).")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ListPage(BaseModel):
    """OpenAI's cursor page: `data` newest first, `has_more`; the SDK asks for more with `after=`."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class JobEventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def file_out(file: TrainingFile) -> FileObject:
    return FileObject(
        id=file.id, bytes=file.bytes, created_at=file.created_at, filename=file.filename, purpose=file.purpose
    )


def job_out(job: Job) -> FineTuningJob:
    hyper = job.hyperparameters
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters={k: hyper[k] for k in OPENAI_HYPERPARAMETERS},
        model=job.model,
        organization_id=job.tenant,
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish,
        metadata=job.metadata,
        method={"type": "supervised", "supervised": {"hyperparameters": dict(hyper)}},
        user_provided_suffix=job.suffix,
    )


def event_out(event: JobEvent, event_id: str) -> JobEventOut:
    return JobEventOut(
        id=event_id,
        created_at=event.created_at,
        level=event.level,
        message=event.message,
        type=event.type,
        data=event.data,
    )


def checkpoint_id(job: Job, step: int) -> str:
    return f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}"


def checkpoint_out(job: Job, record: dict[str, Any]) -> CheckpointOut:
    """A checkpoint is a resume point of the job, named as the task would be at that step; only the
    job's final prefix is stored and served."""
    step = int(record["step"])
    metrics = record.get("metrics") or {}
    return CheckpointOut(
        id=checkpoint_id(job, step),
        created_at=int(record["created_at"]),
        fine_tuned_model_checkpoint=f"{job.task}:ckpt-step-{step}",
        fine_tuning_job_id=job.id,
        metrics={k: metrics[k] for k in ("step", "train_loss", "valid_loss") if k in metrics},
        step_number=step,
    )


def page(items: list[Any], has_more: bool) -> ListPage:
    return ListPage(
        data=items,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )

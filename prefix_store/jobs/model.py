"""The records of the fine-tuning API: training files, jobs, their events and checkpoints.

Plain dataclasses that round-trip through JSON (`to_json` / `from_json`): the stores keep them as JSON
documents, the API turns them into OpenAI's objects. A `Job` carries, besides what the API shows, the
bookkeeping of its run: which worker holds it and until when (`worker`, `lease_until`), how far it got
(`step`, `total_steps`), its checkpoints, and `phase` once training is over (`trained`: the artifact is
written and waits for a serving replica to store it; `publishing`: one is storing it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

# OpenAI's statuses, plus `paused` (its pause/resume endpoints).
VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (VALIDATING, QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = frozenset({VALIDATING, QUEUED, RUNNING, PAUSED})
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Jobs waiting for a worker, as `tenant_max_queued_jobs` counts them.
WAITING = frozenset({VALIDATING, QUEUED, PAUSED})

TRAINED = "trained"  # phase: the worker wrote the artifact; a serving replica stores it next
PUBLISHING = "publishing"  # phase: a serving replica is storing it

FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
_ID_RE = re.compile(r"(file|ftjob)-[0-9a-f]{24}")
_EVENT_RE = re.compile(r"ftevent-([0-9]{1,9})")


def new_id(prefix: str) -> str:
    """A random id (`file-…`, `ftjob-…`): 96 bits, so ids are never guessed or reused."""
    return prefix + secrets.token_hex(12)


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` is a well-formed id of that kind (checked before it touches a key or path)."""
    return value.startswith(prefix) and _ID_RE.fullmatch(value) is not None


def event_id(seq: int) -> str:
    """Events are numbered per job from 0; the id carries the number (the pagination cursor)."""
    return f"ftevent-{seq}"


def event_seq(value: str) -> int | None:
    """The number in an event id, or None when `value` is not one."""
    match = _EVENT_RE.fullmatch(value)
    return int(match.group(1)) if match else None


class _Json:
    """JSON round trip of a flat dataclass (nested values are plain JSON already)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Any:
        obj = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass
class TrainingFile(_Json):
    """An uploaded training (or validation) file: `shape` is the row shape every line has
    (`training.job_data.SHAPES`), `num_examples` its examples."""

    id: str
    tenant: str
    filename: str
    bytes: int
    created_at: int
    shape: str
    num_examples: int
    purpose: str = "fine-tune"
    seq: int = 0  # order of creation within the tenant (listing, newest first)


@dataclass
class JobEvent(_Json):
    """One line of a job's log: a message, or a step's metrics (`type` "metrics", `data`). `seq` is its
    place in the job's log, given by the store when it is read back."""

    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None
    seq: int = 0


@dataclass
class Job(_Json):
    """A fine-tuning job (module docstring). `hyperparameters` are the resolved values (every default
    filled in), `task` the name its artifact is stored under (`fine_tuned_model` once it succeeded)."""

    id: str
    tenant: str
    model: str
    training_file: str
    task: str
    created_at: int
    hyperparameters: dict[str, Any]
    seed: int
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    status: str = VALIDATING
    seq: int = 0
    error: dict[str, Any] | None = None  # {code, message, param}
    fine_tuned_model: str | None = None
    version: int | None = None  # the stored version of `task`
    finished_at: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    queued_at: float | None = None
    started_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    attempts: int = 0  # times a worker started (or resumed) it
    worker: str | None = None
    lease_until: float | None = None
    phase: str | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {step, created_at, metrics}

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def fail(self, code: str, message: str, param: str | None, now: float) -> None:
        """End the job as failed with OpenAI's `error` object."""
        self.status = FAILED
        self.error = {"code": code, "message": message, "param": param}
        self.finish(now)

    def finish(self, now: float) -> None:
        self.finished_at = int(now)
        self.estimated_finish = None
        self.worker = self.lease_until = None
        self.phase = None

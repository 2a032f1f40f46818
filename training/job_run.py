"""One fine-tuning job on the training recipe: its files' examples, the paper's trainable prefix and
loop (`training.prefix`, `training.trainer`), checkpoints in the job's work directory, and the artifact.

A job maps to `prefixserve train` (docs/training.md, "Jobs through the API"): `n_epochs` is
`--epochs`, `batch_size` `--batch-size`, the learning rate is `BASE_LR` (the paper's 5e-5) times
`learning_rate_multiplier`; the prefix-tuning extras are `prefix_length`, `mlp_hidden` (the
reparameterisation MLP's width k), `init` and `init_text` (initialisation from real words),
`placement` (BART: "paper" trains encoder, decoder and cross-attention prefixes, "peft" the decoder's
only), `checkpoint_every` (optimizer steps). The validation file is the `--dev` file: its loss is
evaluated every epoch and the best state is exported. A work directory that holds checkpoints is
resumed from its latest (a worker killed mid-run, a paused job), replaying the same batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from modeling.models import LoadedModel
from prefix_store.artifact import dump_artifact
from training.cli import build_rows
from training.data import Example
from training.export import build_artifact, training_metadata
from training.job_data import FileExample, Shape, chat_template, steps_per_epoch
from training.prefix import PrefixConfig, make_tuner
from training.trainer import StepHook, TrainConfig, list_checkpoints, train

BASE_LR = 5e-5  # the paper's default learning rate; a job's `learning_rate_multiplier` scales it
KEEP_CHECKPOINTS = 3  # what a job lists and may resume from (OpenAI keeps the last three too)


@dataclass(frozen=True)
class JobData:
    """A job's examples: the training file's, and the validation file's (may be empty)."""

    shape: Shape
    train: list[FileExample]
    valid: list[FileExample]


@dataclass(frozen=True)
class JobOutcome:
    """What a finished run leaves: the artifact's bytes and what the job reports."""

    artifact: bytes
    trained_tokens: int
    steps: int
    train_loss: float | None
    valid_loss: float | None


def plan(hyper: dict[str, Any], num_examples: int, seed: int) -> tuple[PrefixConfig, TrainConfig]:
    """The recipe's configs for a job's resolved hyperparameters (module docstring)."""
    epoch_steps = steps_per_epoch(num_examples, int(hyper["batch_size"]))
    prefix = PrefixConfig(
        prefix_length=int(hyper["prefix_length"]),
        mlp_hidden=int(hyper["mlp_hidden"]),
        init_text=hyper.get("init_text"),
        placement=str(hyper["placement"]),
        init=str(hyper.get("init") or "text-fit"),
    )
    loop = TrainConfig(
        lr=BASE_LR * float(hyper["learning_rate_multiplier"]),
        epochs=int(hyper["n_epochs"]),
        batch_size=int(hyper["batch_size"]),
        seed=seed,
        checkpoint_every=int(hyper.get("checkpoint_every") or epoch_steps),
        keep_checkpoints=KEEP_CHECKPOINTS,
        progress=False,
    )
    return prefix, loop


def run_job(
    loaded: LoadedModel,
    job: Any,
    data: JobData,
    work: Path,
    on_step: StepHook,
) -> JobOutcome:
    """Train `job` (a `prefix_store.jobs.model.Job`) on `data` in `work`, resuming from its latest
    checkpoint there; `on_step` may stop it (`training.trainer.TrainingStopped`)."""
    shape = data.shape
    prefix_cfg, loop_cfg = plan(job.hyperparameters, len(data.train), job.seed)
    resume = work if list_checkpoints(work) else None

    def rows(examples: list[FileExample]) -> list[dict[str, list[int]]]:
        pairs = [Example(ex.source, ex.target) for ex in examples]
        return build_rows(loaded, pairs, shape.truncation, paper=shape.paper)

    train_rows, dev_rows = rows(data.train), (rows(data.valid) if data.valid else None)
    torch.manual_seed(job.seed)  # the prefix MLPs' random init
    # A resumed run loads its trained prefix from the checkpoint: no init fit over it.
    tuner = make_tuner(
        loaded, PrefixConfig(**{**asdict(prefix_cfg), "init_text": None}) if resume else prefix_cfg
    )
    pad_id = int(loaded.tokenizer.pad_token_id)
    result = train(tuner, train_rows, dev_rows, loop_cfg, work, pad_id, resume=resume, on_step=on_step)
    dataset = {
        "job": job.id,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "shape": shape.name,
        "format": shape.data_format,
        "source_form": "paper" if shape.paper else "plain",
        "num_train": len(train_rows),
    }
    prefix_meta = asdict(prefix_cfg) | {"kinds": list(tuner.kinds), "source_prepend": None}
    meta = training_metadata(prefix_meta, loop_cfg, shape.truncation, dataset, job.model, result)
    if shape.name == "chat":  # /v1/chat/completions renders a request as this job's sources were
        meta["chat_template"] = chat_template(
            "" if loaded.spec.is_encoder_decoder else loaded.tokenizer.eos_token
        )
    artifact = dump_artifact(build_artifact(tuner, job.task, meta))
    state = result.state
    return JobOutcome(
        artifact=artifact,
        trained_tokens=state.num_tokens,
        steps=state.step,
        train_loss=state.train_losses[-1][1] if state.train_losses else None,
        valid_loss=state.best_dev_loss,
    )

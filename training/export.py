"""Export a trained prefix: compute P once (the MLPs' outputs), drop the MLPs, write the artifact.

`OUT/artifact.safetensors` is the product's artifact (`prefix_store.artifact`), float32, holding every
prefix kind the tuner trained, with the run's metadata under `training`. For GPT-2, `OUT/peft/` is the
same prefix as a HF PEFT adapter (`prefix_store.peft_format.artifact_to_peft`: `prompt_embeddings` is
the MLP's output, `prefix_projection` false, so `PeftModel.from_pretrained` loads it without the MLP). PEFT cannot express BART's encoder/cross prefixes, so
BART runs get the artifact only.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prefix_store.artifact import PrefixArtifact, dump_artifact, new_artifact
from prefix_store.peft_format import artifact_to_peft
from training.formats import Truncation
from training.prefix import GPT2PrefixTuner, PrefixTuner
from training.trainer import TrainConfig, TrainResult

ARTIFACT_NAME = "artifact.safetensors"
PEFT_DIR = "peft"


@torch.no_grad()
def build_artifact(tuner: PrefixTuner, task: str, training: dict[str, Any]) -> PrefixArtifact:
    """The artifact for the tuner's current prefixes (float32, validated against the model's spec)."""
    was_training = tuner.training
    tuner.eval()
    # No autocast here: P is computed once in float32, whatever the training precision was.
    prefixes = {kind: p.float() for kind, p in tuner.prefixes().items()}  # kind -> [layers, 2, H, L, D]
    tuner.train(was_training)
    return new_artifact(prefixes, tuner.loaded.spec, task=task, training=training)


def export(tuner: PrefixTuner, out_dir: str | Path, task: str, training: dict[str, Any]) -> dict[str, str]:
    """Write `artifact.safetensors` (and `peft/` for GPT-2) under `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = build_artifact(tuner, task, training)
    path = out / ARTIFACT_NAME
    path.write_bytes(dump_artifact(artifact))
    written = {"artifact": str(path)}
    if isinstance(tuner, GPT2PrefixTuner):
        config_bytes, model_bytes = artifact_to_peft(artifact, tuner.loaded.spec, tuner.loaded.name)
        peft_dir = out / PEFT_DIR
        peft_dir.mkdir(exist_ok=True)
        (peft_dir / "adapter_config.json").write_bytes(config_bytes)
        (peft_dir / "adapter_model.safetensors").write_bytes(model_bytes)
        written["peft"] = str(peft_dir)
    return written


def training_metadata(
    prefix: dict[str, Any],
    loop: TrainConfig,
    truncation: Truncation,
    dataset: dict[str, Any],
    base_model: str,
    result: TrainResult,
) -> dict[str, Any]:
    """The artifact's `training` metadata for a run: its settings, data, and how it went."""
    state = result.state
    return {
        "prefix": prefix,
        "loop": asdict(loop),
        "truncation": asdict(truncation),
        "dataset": dataset,
        "base_model": base_model,
        "steps": state.step,
        "epochs_completed": state.epoch,
        "exported_step": result.exported_step,
        "stopped_early": result.stopped_early,
        "final_train_loss": state.train_losses[-1][1] if state.train_losses else None,
        "final_dev_loss": state.dev_losses[-1][1] if state.dev_losses else None,
        "best_dev_loss": state.best_dev_loss,
        "best_dev_bleu": state.best_dev_bleu,
        "train_seconds": round(state.train_seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

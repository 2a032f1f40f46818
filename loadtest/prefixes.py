"""One random prefix per task, in both forms the runners need: PEFT adapter folders and prefixserve
artifacts that compute the same function.

PEFT builds each adapter (so its `adapter_config.json` is exactly what PEFT itself writes for this
model), we fill the prompt embedding with seeded random values and save it; the artifact is the
import of those very files (`peft_to_artifact`), so the engine and the PEFT baselines attend to the
same keys and values. For BART that is the decoder self-attention prefix only: the one placement PEFT
can express.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling.models import LoadedModel
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.peft_format import peft_to_artifact


@dataclass
class TaskPrefixes:
    """Per task: its PEFT adapter folder and its artifact bytes (what the store / upload API takes)."""

    peft_dirs: dict[str, Path]
    artifacts: dict[str, bytes]
    lengths: dict[str, int]


def make_task_prefixes(
    loaded: LoadedModel,
    tasks: list[str],
    lengths: dict[str, int],
    out_dir: Path,
    seed: int = 0,
    with_peft: bool = True,
) -> TaskPrefixes:
    """Write a PEFT adapter per task under `out_dir/<task>` and build the matching artifacts.

    `with_peft=False`: artifacts only, built directly (thousands of tasks, no PEFT runner to feed).

    PEFT's `get_peft_model` wraps the model it is given, so it gets a throwaway copy of the base model
    (a prefix-tuning wrapper changes no weights, but runners must start from the pristine model).
    """
    import copy

    import peft

    if not with_peft:
        return _artifacts_only(loaded, tasks, lengths, seed)

    task_type = "SEQ_2_SEQ_LM" if loaded.spec.is_encoder_decoder else "CAUSAL_LM"
    scratch = copy.deepcopy(loaded.model).to("cpu", torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_dirs: dict[str, Path] = {}
    artifacts: dict[str, bytes] = {}
    gen = torch.Generator().manual_seed(seed)
    wrapper = None
    for task in tasks:
        config = peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=lengths[task], inference_mode=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if wrapper is None:
                wrapper = peft.get_peft_model(scratch, config, adapter_name=task)
            else:
                wrapper.add_adapter(task, config)
        weight = wrapper.prompt_encoder[task].embedding.weight  # [L, num_layers * 2 * d_model]
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=gen))
        folder = out_dir / task
        wrapper.save_pretrained(str(folder), selected_adapters=[task])
        # PEFT saves a non-default adapter in a sub-folder named after it; flatten to one folder per task.
        nested = folder / task
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(folder / f.name)
            nested.rmdir()
        config_path = folder / "adapter_config.json"
        config_json = json.loads(config_path.read_text())
        config_json["base_model_name_or_path"] = loaded.name
        config_path.write_text(json.dumps(config_json, indent=2))
        artifact = peft_to_artifact(
            config_path.read_bytes(),
            (folder / "adapter_model.safetensors").read_bytes(),
            loaded.spec,
            task=task,
        )
        peft_dirs[task] = folder
        artifacts[task] = dump_artifact(artifact)
    del wrapper, scratch
    return TaskPrefixes(peft_dirs=peft_dirs, artifacts=artifacts, lengths=dict(lengths))


def _artifacts_only(
    loaded: LoadedModel, tasks: list[str], lengths: dict[str, int], seed: int
) -> TaskPrefixes:
    """Random prefixes `[layers, 2, H, L, D]` (standard normal, like the PEFT path's embeddings)."""
    spec = loaded.spec
    gen = torch.Generator().manual_seed(seed)
    artifacts = {}
    for task in tasks:
        shape = (spec.num_layers, 2, spec.num_heads, lengths[task], spec.head_dim)
        prefix = torch.randn(shape, generator=gen)
        artifacts[task] = dump_artifact(new_artifact({"decoder": prefix}, spec, task=task))
    return TaskPrefixes(peft_dirs={}, artifacts=artifacts, lengths=dict(lengths))

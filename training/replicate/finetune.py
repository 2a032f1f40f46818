"""Full fine-tuning through the prefix-tuning loop: same rows, batches, optimizer and schedule.

`FullModelTuner` is a `PrefixTuner` whose trainable parameters are all of the model's and whose loss
is the model's own causal-LM loss on the same collated batches (labels -100 on the source), so
`training.trainer.train` runs it step for step like a prefix. No prefix: it serves as a plain model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from modeling.models import LoadedModel
from training.prefix import PrefixConfig, PrefixTuner


class FullModelTuner(PrefixTuner):
    """Every weight of the base model trainable (dropout stays off, as for the prefix runs)."""

    kinds = ()

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded, PrefixConfig())
        self.model = loaded.model  # registered: its parameters are the trainable ones
        self.model.requires_grad_(True)

    def train(self, mode: bool = True) -> FullModelTuner:
        super().train(mode)
        self.model.eval()  # no dropout (the config has none either)
        return self

    def prefixes(self) -> dict[str, Tensor]:
        return {}

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return out.loss

    def save(self, out_dir: Path) -> Path:
        """The fine-tuned model as a HF directory (with the tokenizer) that `prefixserve eval` loads."""
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            self.model.save_pretrained(out_dir)
        self.loaded.tokenizer.save_pretrained(out_dir)
        return out_dir

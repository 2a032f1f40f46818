"""Per-step training log: `OUT/train_log.jsonl` always, TensorBoard event files when it is installed.

One JSON object per line: `{"step", "epoch", "loss", "lr", "tokens", "seconds"}` after every optimizer
step, `{"step", "dev_loss"}` (and `"dev_bleu"` when measured) after each dev evaluation. The file is
appended to, so a resumed run continues the same log; `tail -f` shows a run live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_NAME = "train_log.jsonl"


class StepLog:
    """Writes the JSONL log (flushed per line) and mirrors scalars to TensorBoard if available."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = out_dir / LOG_NAME
        self._file = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            try:  # optional: `pip install tensorboard`
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

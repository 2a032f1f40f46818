"""Timing helpers shared by runners."""

from __future__ import annotations

import time
from typing import Any

WARMUP_PROMPT_LEN = 8
WARMUP_NEW_TOKENS = 2


class RunClock:
    """Seconds since the run's start (`perf_counter`, monotonic)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


class StepTimer:
    """A `transformers` streamer that timestamps each generation step.

    `generate` first puts the prompt (decoder-only) or the decoder start token (encoder-decoder), then
    one tensor of `[B]` new tokens per step; `times[k]` is when step k's tokens were ready.
    """

    def __init__(self, clock: RunClock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(self.clock.now())

    def end(self) -> None:
        pass

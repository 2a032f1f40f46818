"""The HF PEFT baselines: `naive_peft` (one request at a time) and `static_batch` (one task per batch).

Both hold every task's adapter in one `PeftModel` (`from_pretrained` for the first, `load_adapter`
for the rest) and switch with `set_adapter`, greedy decoding, `min_new_tokens = max_new_tokens` so
EOS never stops a request early.

The baselines take the prefix from PEFT (`get_prompt`, the active adapter's keys/values) and hand it
to `generate` as `past_key_values` explicitly, with the attention mask extended over the prefix
(decoder-only), or through the PeftModel's seq2seq generate (BART), which were checked against PEFT's
own forward pass (tests/prefix_store/test_peft_seq2seq.py and tests/loadtest). The work is the same
as PEFT's own generate; explicit, because PEFT's way of passing the prefix broke when transformers
5.24 renamed `past_key_values` to `cache` (pyproject pins 5.19, which vLLM 0.32 requires).

Static batching: requests are served as they arrive; when the model is free, it takes the task of
the oldest waiting request and batches up to `max_batch_size` of that task's waiting requests (left
padding, pad = EOS). The batch generates max(max_new_tokens) of its members: that is the cost of
static batching. A request's output is only its own requested tokens, and its end is its own last
token (as if streamed), which is generous to this baseline.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch

from loadtest.machine import PeakMemory
from loadtest.metrics import RequestRecord, RunResult
from loadtest.runners.common import WARMUP_NEW_TOKENS, WARMUP_PROMPT_LEN, RunClock, StepTimer
from loadtest.workload import ClientPool, RequestSpec, Workload
from modeling.bart_prefix import wrap_source
from modeling.models import LoadedModel


class PeftBaseline:
    """All tasks' adapters in one PeftModel, and a batched greedy `generate` with one task's prefix."""

    def __init__(self, loaded: LoadedModel, peft_dirs: dict[str, Path]) -> None:
        from peft import PeftModel

        self.loaded = loaded
        self.encoder_decoder = loaded.spec.is_encoder_decoder
        config = loaded.model.config
        self.eos = int(config.eos_token_id)
        self.pad = int(config.pad_token_id) if config.pad_token_id is not None else self.eos
        tasks = list(peft_dirs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = PeftModel.from_pretrained(
                loaded.model, str(peft_dirs[tasks[0]]), adapter_name=tasks[0]
            )
            for task in tasks[1:]:
                self.model.load_adapter(str(peft_dirs[task]), adapter_name=task)
        self.model.to(loaded.device, loaded.dtype)
        self.model.eval()

    def unload(self) -> None:
        """Drop the wrapper; the base model is untouched (prefix tuning injects no layers)."""
        del self.model

    @torch.inference_mode()
    def generate(
        self, task: str, prompts: list[list[int]], num_new: int, streamer: StepTimer | None
    ) -> torch.Tensor:
        """Generate exactly `num_new` tokens for each prompt (one task), left-padded into one batch.

        Returns the generated ids `[B, num_new]`.
        """
        dev = self.loaded.device
        self.model.set_adapter(task)
        sources = (
            [wrap_source(p, self.loaded.model.config) for p in prompts] if self.encoder_decoder else prompts
        )
        width = max(len(s) for s in sources)
        input_ids = torch.tensor([[self.pad] * (width - len(s)) + s for s in sources], device=dev)  # [B, S]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sources], device=dev)  # [B, S]
        batch = len(prompts)
        kwargs: dict[str, Any] = {
            "max_new_tokens": num_new,
            "min_new_tokens": num_new,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.pad,
            "streamer": streamer,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = self.model.get_prompt(batch_size=batch)  # the active adapter's prefix K/V
            if self.encoder_decoder:
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs
                )
            else:
                length = int(self.model.peft_config[task].num_virtual_tokens)
                full_mask = torch.cat([torch.ones(batch, length, dtype=mask.dtype, device=dev), mask], dim=1)
                out = self.model.base_model.generate(
                    input_ids=input_ids, attention_mask=full_mask, past_key_values=cache, **kwargs
                )
        return out[:, -num_new:]  # [B, num_new]

    def warm_up(self, task: str, vocab_token: int) -> None:
        self.generate(task, [[vocab_token] * WARMUP_PROMPT_LEN], WARMUP_NEW_TOKENS, None)


def _wait_for_work(pool: ClientPool, queue: deque[RequestSpec], clock: RunClock) -> bool:
    """Move arrived requests into `queue`; sleep until the next arrival if nothing waits. False: all done."""
    queue.extend(pool.arrived(clock.now()))
    if queue:
        return True
    nxt = pool.next_arrival()
    if nxt is None:
        return False
    time.sleep(max(0.0, nxt - clock.now()))
    queue.extend(pool.arrived(clock.now()))
    return True


def run_naive(baseline: PeftBaseline, workload: Workload) -> RunResult:
    """One request at a time in arrival order, switching adapters per request."""
    baseline.warm_up(workload.tasks[0], 100)
    with PeakMemory(baseline.loaded.device) as mem:
        clock = RunClock()
        pool = ClientPool(workload)
        queue: deque[RequestSpec] = deque()
        records: list[RequestRecord] = []
        while _wait_for_work(pool, queue, clock):
            req = queue.popleft()
            timer = StepTimer(clock)
            baseline.generate(req.task, [req.prompt_ids], req.max_new_tokens, timer)
            rec = RequestRecord.of(
                req,
                req.task,
                pool.arrival_s[req.request_id],
                token_times=timer.times,
                end=timer.times[-1],
                finish_reason="length",
            )
            records.append(rec)
            pool.finish(rec.end)
        wall = clock.now()
    return RunResult("naive_peft", records, wall, mem.peak_rss_bytes, mem.peak_device_bytes)


def run_static(baseline: PeftBaseline, workload: Workload, max_batch_size: int) -> RunResult:
    """Per-task static batches of waiting requests (see the module docstring)."""
    baseline.warm_up(workload.tasks[0], 100)
    computed = 0
    num_batches = 0
    with PeakMemory(baseline.loaded.device) as mem:
        clock = RunClock()
        pool = ClientPool(workload)
        queue: deque[RequestSpec] = deque()
        records: list[RequestRecord] = []
        while _wait_for_work(pool, queue, clock):
            task = queue[0].task
            members = [r for r in queue if r.task == task][:max_batch_size]
            for r in members:
                queue.remove(r)
            num_new = max(r.max_new_tokens for r in members)
            timer = StepTimer(clock)
            baseline.generate(task, [r.prompt_ids for r in members], num_new, timer)
            num_batches += 1
            width = max(len(r.prompt_ids) for r in members)
            computed += len(members) * (width + num_new)
            for r in members:
                times = timer.times[: r.max_new_tokens]
                rec = RequestRecord.of(
                    r,
                    r.task,
                    pool.arrival_s[r.request_id],
                    token_times=times,
                    end=times[-1],
                    finish_reason="length",
                )
                records.append(rec)
                pool.finish(rec.end)
        wall = clock.now()
    return RunResult(
        "static_batch",
        records,
        wall,
        mem.peak_rss_bytes,
        mem.peak_device_bytes,
        computed_tokens=computed,
        extra={"num_batches": num_batches, "max_batch_size": max_batch_size},
    )

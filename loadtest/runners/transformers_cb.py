"""`transformers_cb`: transformers' own continuous batching (`ContinuousBatchingManager`), no prefixes.

A peer nobody here wrote: the same token ids and output lengths as the other runners, greedy, EOS off
(`eos_token_id=-1`), served by the manager that `model.generate_batch` uses (paged KV, its own
scheduler, in its own thread). Closed loop: `concurrency` requests in flight; a finished one is
replaced by the next. Token times come from the manager's own per-token timestamps
(`record_timestamps`, `time.perf_counter`), so no streaming overhead is added on our side.
"""

from __future__ import annotations

from transformers import GenerationConfig
from transformers.generation.continuous_batching.continuous_api import WorkloadHints

from loadtest.machine import PeakMemory
from loadtest.metrics import RequestRecord, RunResult
from loadtest.runners.common import RunClock
from loadtest.workload import Workload
from modeling.models import LoadedModel


def run_transformers_cb(loaded: LoadedModel, workload: Workload, max_batch_size: int) -> RunResult:
    model = loaded.model
    requests = workload.requests
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in requests),
        eos_token_id=-1,  # exact output lengths, like the other runners' ignore_eos
        pad_token_id=0,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_ids) for r in requests),
        max_generated_length=max(r.max_new_tokens for r in requests),
        num_requests=len(requests),
    )
    concurrency = min(workload.spec.effective_concurrency, max_batch_size, len(requests))
    records: dict[str, RequestRecord] = {}
    with (
        PeakMemory(loaded.device) as mem,
        model.continuous_batching_context_manager(
            generation_config=config, workload_hints=hints, block=True, timeout=30
        ) as manager,
    ):
        clock = RunClock()
        pending = list(requests)
        in_flight = 0

        def submit() -> None:
            nonlocal in_flight
            req = pending.pop(0)
            records[req.request_id] = RequestRecord.of(req, None, clock.now())
            manager.add_request(
                list(req.prompt_ids),
                request_id=req.request_id,
                max_new_tokens=req.max_new_tokens,
                record_timestamps=True,
                eos_token_id=-1,
            )
            in_flight += 1

        while pending and in_flight < concurrency:
            submit()
        while in_flight:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if not result.is_finished():
                continue
            rec = records[result.request_id]
            rec.token_times = [t - clock.t0 for t in (result.timestamps or [])]
            rec.end = rec.token_times[-1] if rec.token_times else clock.now()
            rec.finish_reason = "length"
            rec.error = result.error
            in_flight -= 1
            if pending:
                submit()
        wall = clock.now()
    return RunResult(
        "transformers_cb",
        [records[r.request_id] for r in requests],
        wall,
        mem.peak_rss_bytes,
        mem.peak_device_bytes,
        extra={"max_batch_size": max_batch_size},
    )

"""Where the engine's time goes: one extra engine run of the main workload under two profilers.

- `torch.profiler` (CPU, and CUDA when present): operator time across threads, so it sees the
  engine's worker thread where the model runs. Written as `engine_ops.txt` (top operators by self
  time).
- `cProfile` for Python: the event-loop thread (scheduling, streaming, detokenising) and, via
  `threading.setprofile`, every thread started during the run (the engine's worker). Written as
  `engine_cprofile.txt` (top functions by cumulative time, per thread).

The profiled run is slower than the timed ones (profilers add overhead), so only its proportions
count; the benchmark numbers come from the unprofiled runs.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import threading
from pathlib import Path
from typing import Any

import torch

from loadtest.prefixes import make_task_prefixes
from loadtest.workload import make_workload
from prefixserve.models import load_model


def profile_engine(
    section: Any, dtype: str, device: torch.device, models_dir: Path, out_dir: Path, scratch: Path
) -> dict[str, Any]:
    """Profile one engine run of `section`'s workload; returns a small summary for results.json."""
    from loadtest.bench import GPT2_TEXT_VOCAB, ensure_model
    from loadtest.runners.engine_runner import run_engine
    from server.engine import EngineConfig

    model_dir = ensure_model(section.preset, models_dir)
    loaded = load_model(str(model_dir), device=str(device), dtype=dtype)
    workload = make_workload(
        section.workload, min(loaded.spec.vocab_size, GPT2_TEXT_VOCAB), loaded.model.config.eos_token_id
    )
    lengths = {t: workload.prefix_length(t) for t in workload.tasks}
    prefixes = make_task_prefixes(loaded, workload.tasks, lengths, scratch / "profile-peft")
    config = EngineConfig(max_batch_size=section.max_batch_size, max_waiting=4096, queue_timeout_s=3600.0)

    thread_profiles: list[tuple[str, cProfile.Profile]] = []

    def start_thread_profile(*_: Any) -> None:
        # Runs once as the first profiling event of each new thread: swap in a real profiler there.
        prof = cProfile.Profile()
        thread_profiles.append((threading.current_thread().name, prof))
        prof.enable()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    main_prof = cProfile.Profile()
    threading.setprofile(start_thread_profile)
    try:
        with torch.profiler.profile(activities=activities) as tprof:
            main_prof.enable()
            run = run_engine(loaded, workload, prefixes.artifacts, config)
            main_prof.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]

    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = tprof.key_averages().table(sort_by=sort_key, row_limit=30)
    (out_dir / "engine_ops.txt").write_text(ops)

    text = io.StringIO()
    for name, prof in [("event loop (main thread)", main_prof), *thread_profiles]:
        text.write(f"==== {name} ====\n")
        try:
            stats = pstats.Stats(prof, stream=text)
        except TypeError:  # a thread that never ran Python code
            continue
        stats.sort_stats("cumulative").print_stats(35)
    (out_dir / "engine_cprofile.txt").write_text(text.getvalue())
    total_op_s = sum(e.self_cpu_time_total for e in tprof.key_averages()) / 1e6
    top = sorted(tprof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "profiled_wall_s": run.wall_s,
        "operator_self_cpu_s": total_op_s,
        "top_ops_self_cpu_s": {e.key: e.self_cpu_time_total / 1e6 for e in top},
        "files": ["engine_ops.txt", "engine_cprofile.txt"],
    }

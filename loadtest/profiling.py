"""Where the engine's time goes: one extra engine run of the main workload under `cProfile`.

The engine runs the model in a worker thread, which neither `cProfile` on the main thread nor
`torch.profiler` (it records the thread that started it) sees. So a `threading.setprofile` hook
starts a separate `cProfile.Profile` in every thread created during the run, the engine's worker
included. Built-in torch calls (`torch.addmm`, `scaled_dot_product_attention`, `torch.zeros`...)
appear as functions with their own time, which on CPU is operator time; on CUDA it is launch time
only (kernels run asynchronously), so read GPU profiles with that in mind.

Written: `engine_cprofile.txt` (per thread, top functions by cumulative time) and, in results.json,
`engine_profile` with the worker thread's top functions by own time. The profiled run is slower
than the timed ones; only its proportions count.
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
from modeling.models import load_model


def profile_engine(
    section: Any, dtype: str, device: torch.device, models_dir: Path, out_dir: Path, scratch: Path
) -> dict[str, Any]:
    """Profile one engine run of `section`'s workload; returns a small summary for results.json."""
    from loadtest.bench_models import GPT2_TEXT_VOCAB, ensure_model
    from loadtest.runners.engine_runner import run_engine
    from server.engine import EngineConfig
    from server.limits import Limits

    model_dir = ensure_model(section.preset, models_dir, section.model_overrides)
    loaded = load_model(str(model_dir), device=str(device), dtype=dtype)
    workload = make_workload(
        section.workload, min(loaded.spec.vocab_size, GPT2_TEXT_VOCAB), loaded.model.config.eos_token_id
    )
    lengths = {t: workload.prefix_length(t) for t in workload.tasks}
    prefixes = make_task_prefixes(loaded, workload.tasks, lengths, scratch / "profile-peft")
    config = EngineConfig(
        Limits(max_batch_size=section.max_batch_size, max_waiting=4096, queue_timeout_s=3600.0)
    )

    thread_profiles: list[tuple[str, cProfile.Profile]] = []

    def start_thread_profile(*_: Any) -> None:
        # Runs once as the first profiling event of each new thread: swap in a real profiler there.
        prof = cProfile.Profile()
        thread_profiles.append((threading.current_thread().name, prof))
        prof.enable()

    main_prof = cProfile.Profile()
    threading.setprofile(start_thread_profile)
    try:
        main_prof.enable()
        run = run_engine(loaded, workload, prefixes.artifacts, config)
        main_prof.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]

    text = io.StringIO()
    for name, prof in [("event loop (main thread)", main_prof), *thread_profiles]:
        text.write(f"==== {name} ====\n")
        try:
            stats = pstats.Stats(prof, stream=text)
        except TypeError:  # a thread that never ran Python code
            continue
        stats.sort_stats("cumulative").print_stats(35)
    (out_dir / "engine_cprofile.txt").write_text(text.getvalue())
    worker = [prof for name, prof in thread_profiles if name.startswith("prefixserve-engine")]
    return {
        "profiled_wall_s": run.wall_s,
        "worker_top_self_s": _top_self_time(worker[0]) if worker else {},
        "files": ["engine_cprofile.txt"],
    }


def _top_self_time(prof: cProfile.Profile, limit: int = 15) -> dict[str, float]:
    """Function -> own time (s), the largest first: on CPU, built-in torch calls are operator time."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    out = {}
    for (filename, line, func), (_, _, tottime, _, _) in rows:
        where = func if filename == "~" else f"{Path(filename).name}:{line}({func})"
        out[where] = round(tottime, 4)
    return out

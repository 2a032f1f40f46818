"""`prefixserve bench`: run one workload through every runner, in one process run, and report.

    prefixserve bench --profile quick|default|gpu [--out DIR] [--runners engine,naive_peft] ...

Profiles (sizes chosen to fit their time budgets on the machines named):
- `quick`   (< 3 min, 2 CPU cores): gpt2-shaped fp32, 16 requests over 4 tasks, short prompts and
            outputs, all five runners, engine scaling at concurrency 1, 4, 16.
- `default` (< 15 min, 2 CPU cores): gpt2-shaped fp32, 64 concurrent requests over 16 tasks, prompts
            32-128, outputs 16-64 (the workload the engine was built for), all five runners, engine scaling
            1 -> 128; then bart-base-shaped: 512-token sources, 32-64 new tokens, 16 requests over 4
            tasks, with engine / no_prefix / naive_peft / static_batch.
- `gpu`     (CUDA, bfloat16): gpt2-medium and bart-large shapes, larger workloads.
- `structured` (CPU, about 15 minutes): a 64-request burst over 16 tasks through our server on each
            backend, with a JSON schema on half the requests (`server_native_json`, `server_vllm_json`)
            and on none (`server_native`, `server_vllm`), in fp32 (`loadtest.structured_load`).
- `vllm`    (CPU, about half an hour): stock vLLM on the bare model (`vllm_bare`) and our server
            on each engine backend (`server_vllm`, `server_native`), 16 tasks / 4 tasks at L=200 /
            1,024 Zipf tasks, each in fp32 and bf16 (six sections, one report); `gpu-vllm` on CUDA.
Also `long-prefix`, `many-tasks` and `overhead`; docs/benchmarks.md has the table.

Model directories (random weights, exact shapes) are written once under `--models-dir` (default
`models/`). Output: `results.json`, `report.md`, `throughput_vs_concurrency.png`, `latency_cdf.png`
in `--out` (default `bench-results/<profile>/`). See docs/benchmarks.md for how to read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loadtest import report
from loadtest.bench_models import GPT2_TEXT_VOCAB, ensure_model
from loadtest.machine import bart_flops, gpt2_flops, machine_info, measure_matmul_peak
from loadtest.metrics import SLO, RunResult, summarize
from loadtest.prefixes import make_task_prefixes
from loadtest.runners.bart_baselines import BART_BASELINES
from loadtest.structured_load import SCHEMA_FIELDS, STRUCTURED_RUNNERS, schema_on_every_other
from loadtest.workload import Workload, WorkloadSpec, make_workload
from modeling.models import DTYPES, LoadedModel, load_model, resolve_device

ALL_RUNNERS = (
    "engine",
    "no_prefix",
    "http",
    "naive_peft",
    "static_batch",
    "transformers_cb",
    "engine_16_tasks",
    "vllm_bare",
    "server_vllm",
    "server_native",
    *BART_BASELINES,
    "server_vllm_json",
    "server_native_json",
)
# Stock vLLM on the bare model, and our server on each engine backend, all over HTTP.
VLLM_RUNNERS = ("vllm_bare", "server_vllm", "server_native")
SERVER_BACKENDS = {  # runner -> PREFIXSERVE_ENGINE
    "server_vllm": "vllm",
    "server_native": "native",
    "server_vllm_json": "vllm",  # the same, a JSON schema on half the requests (loadtest.structured_load)
    "server_native_json": "native",
}
# The vLLM backend's prefix table size (bytes), a server setting; `many-tasks` sections make it smaller
# than the working set. Its name is the vLLM backend's (server.settings): change it here if it moves.
VLLM_PREFIX_TABLE_SETTING = "vllm_prefix_table_bytes"
PEFT_RUNNERS = ("naive_peft", "static_batch")
DEFAULT_RUNNERS = ("engine", "no_prefix", "http", "naive_peft", "static_batch", "transformers_cb")
# With the default init (std 0.02) and tied embeddings a random BART decoder copies its input token,
# and its decoder starts from EOS: greedy decoding emits EOS at once. Every runner ignores EOS anyway
# (exact output lengths), but the BART benchmark model uses larger random weights (same shapes, same
# cost) so that its outputs are not degenerate strings of EOS.
BART_OVERRIDES: tuple[tuple[str, float], ...] = (("init_std", 0.2),)


@dataclass(frozen=True)
class Section:
    """One model's comparison: a workload, the runners that serve it, and the engine scaling sweep."""

    preset: str
    workload: WorkloadSpec
    runners: tuple[str, ...] = DEFAULT_RUNNERS
    max_batch_size: int = 64  # engine rows; static batching's batch cap is the same
    scaling: tuple[int, ...] = ()  # engine concurrency sweep
    scaling_min_requests: int = 8  # requests per sweep point: max(concurrency, this)
    # make_model_dir config overrides, e.g. (("init_std", 0.2),): weights differ, shapes and cost do not.
    model_overrides: tuple[tuple[str, float], ...] = ()
    # Engine workloads: a device prefix tier smaller than the working set, prefixes warmed for only
    # a few tasks (the rest load through the store during the run), and `engine_16_tasks` (the same
    # requests spread over this many tasks) as the many-task comparison.
    device_prefix_cache_bytes: int | None = None
    max_warm_tasks: int | None = None
    compare_num_tasks: int = 16
    # A name in the report, the dtype when not the profile's, the
    # device tiers in prefixes of the workload's longest length (native: device_prefix_cache_bytes;
    # vLLM backend: its prefix table), and the targets of this section ((ratio key, goal); None: the
    # engine targets of `report.TARGETS`).
    name: str = ""
    dtype: str | None = None
    device_tier_prefixes: int | None = None
    targets: tuple[tuple[str, float], ...] | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    dtype: str
    main: Section
    bart: Section | None = None
    slo: SLO = field(default_factory=SLO)
    sections: tuple[Section, ...] = ()  # more comparisons after `main` (fp32 and bf16 ...)


# The workloads beside vLLM: closed loop at concurrency 64, prompts 32-160, 64 new tokens each.
VLLM_WORKLOADS = {
    "16-tasks": WorkloadSpec(
        num_requests=64,
        num_tasks=16,
        prompt_len=(32, 160),
        output_len=(64, 64),
        concurrency=64,
        prefix_lengths=(10, 10, 10, 5, 10, 10, 10, 20),
    ),
    "long-prefix": WorkloadSpec(
        num_requests=64,
        num_tasks=4,
        prompt_len=(32, 160),
        output_len=(64, 64),
        concurrency=64,
        prefix_lengths=(200,),
    ),
    "many-tasks": WorkloadSpec(
        num_requests=192,
        num_tasks=1024,
        prompt_len=(32, 160),
        output_len=(64, 64),
        concurrency=64,
        task_popularity="zipf",
        prefix_lengths=(10,),
    ),
}


def _vllm_section(kind: str, dtype: str, goal: float) -> Section:
    """One comparison with stock vLLM: `kind` of VLLM_WORKLOADS in `dtype`, our vLLM backend's goal vs vllm_bare."""
    many = kind == "many-tasks"
    return Section(
        preset="gpt2",
        workload=VLLM_WORKLOADS[kind],
        runners=VLLM_RUNNERS,
        max_batch_size=64,
        name=f"{kind}-{'fp32' if dtype == 'float32' else 'bf16'}",
        dtype=dtype,
        device_tier_prefixes=64 if many else None,  # smaller than the 1,024 tasks
        max_warm_tasks=16 if many else None,  # the rest load through the store during the run
        targets=(("server_vllm_vs_vllm_bare", goal),),
    )


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=WorkloadSpec(
                num_requests=16, num_tasks=4, prompt_len=(16, 32), output_len=(8, 16), concurrency=16
            ),
            max_batch_size=16,
            scaling=(1, 4, 16),
            scaling_min_requests=4,
        ),
        slo=SLO(ttft_s=5.0, tpot_s=0.5),
    ),
    "default": Profile(
        name="default",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=WorkloadSpec(
                num_requests=64,
                num_tasks=16,
                prompt_len=(32, 128),
                output_len=(16, 64),
                concurrency=64,
                prefix_lengths=(10, 10, 10, 5, 10, 10, 10, 20),
            ),
            max_batch_size=64,
            scaling=(1, 2, 4, 8, 16, 32, 64, 128),
            scaling_min_requests=4,
        ),
        bart=Section(
            preset="bart-base",
            workload=WorkloadSpec(
                num_requests=16,
                num_tasks=4,
                prompt_len=(512, 512),
                output_len=(32, 64),
                concurrency=16,
                seed=1,
            ),
            runners=("engine", "no_prefix", "naive_peft", "static_batch"),
            max_batch_size=16,
            model_overrides=BART_OVERRIDES,
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    # A task's prefix read once for all its rows (4 tasks x L=200 over 64 requests).
    "long-prefix": Profile(
        name="long-prefix",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=WorkloadSpec(
                num_requests=64,
                num_tasks=4,
                prompt_len=(32, 128),
                output_len=(16, 64),
                concurrency=64,
                prefix_lengths=(200,),
            ),
            runners=("engine", "no_prefix", "transformers_cb"),
            max_batch_size=64,
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    # 1,024 tasks with Zipf popularity, a device prefix tier of 64 prefixes (smaller than the
    # working set), prefixes loaded through the store during the run; vs the same requests over 16 tasks.
    "many-tasks": Profile(
        name="many-tasks",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=WorkloadSpec(
                num_requests=192,
                num_tasks=1024,
                prompt_len=(32, 128),
                output_len=(16, 64),
                concurrency=64,
                task_popularity="zipf",
                prefix_lengths=(10,),
            ),
            runners=("engine", "engine_16_tasks"),
            max_batch_size=64,
            device_prefix_cache_bytes=64 * 12 * 2 * 768 * 10 * 4,  # 64 gpt2 prefixes of length 10, fp32
            max_warm_tasks=16,
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    # Framework/launch overhead per decode step made visible on CPU: 24 narrow layers, batch 64.
    "overhead": Profile(
        name="overhead",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=WorkloadSpec(
                num_requests=64, num_tasks=16, prompt_len=(8, 16), output_len=(48, 64), concurrency=64
            ),
            runners=("engine", "no_prefix", "transformers_cb"),
            max_batch_size=64,
            model_overrides=(("n_layer", 24), ("n_embd", 128), ("n_head", 4)),
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    # Our server on both engine backends beside stock vLLM serving the bare model, over HTTP:
    # 16 tasks (L 5-20), 4 tasks at L=200, and 1,024 Zipf tasks with device tiers of 64 prefixes, each
    # in fp32 and bf16 (one burst: 64 requests, prompts 32-160, 64 new tokens each).
    "vllm": Profile(
        name="vllm",
        device="cpu",
        dtype="float32",
        main=_vllm_section("16-tasks", "float32", 0.9),
        sections=(
            _vllm_section("16-tasks", "bfloat16", 0.9),
            _vllm_section("long-prefix", "float32", 0.8),
            _vllm_section("long-prefix", "bfloat16", 0.8),
            _vllm_section("many-tasks", "float32", 0.7),
            _vllm_section("many-tasks", "bfloat16", 0.7),
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    # Beside vLLM on CUDA (loadtest/gpu_check.sh runs it at --concurrency 64 and 256).
    # Structured output: the 16-task burst with a JSON schema on half the requests vs none, both backends.
    "structured": Profile(
        name="structured",
        device="cpu",
        dtype="float32",
        main=Section(
            preset="gpt2",
            workload=VLLM_WORKLOADS["16-tasks"],
            runners=("server_native", "server_native_json", "server_vllm", "server_vllm_json"),
            max_batch_size=64,
            name="structured-fp32",
            targets=(("server_native_json_vs_server_native", 0.8), ("server_vllm_json_vs_server_vllm", 0.8)),
        ),
        slo=SLO(ttft_s=10.0, tpot_s=0.5),
    ),
    "gpu-vllm": Profile(
        name="gpu-vllm",
        device="cuda",
        dtype="bfloat16",
        main=replace(
            _vllm_section("16-tasks", "bfloat16", 0.9),
            preset="gpt2-medium",
            workload=replace(VLLM_WORKLOADS["16-tasks"], num_requests=512, output_len=(64, 128)),
            runners=(*VLLM_RUNNERS, "engine"),  # engine: where the server's packages are missing
            max_batch_size=256,
        ),
        slo=SLO(ttft_s=1.0, tpot_s=0.05),
    ),
    "gpu": Profile(
        name="gpu",
        device="cuda",
        dtype="bfloat16",
        main=Section(
            preset="gpt2-medium",
            workload=WorkloadSpec(
                num_requests=512,
                num_tasks=64,
                prompt_len=(32, 128),
                output_len=(64, 256),
                concurrency=128,
                task_popularity="zipf",
                prefix_lengths=(10, 10, 10, 5, 10, 10, 10, 20),
            ),
            max_batch_size=128,
            scaling=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            scaling_min_requests=32,
        ),
        bart=Section(
            preset="bart-large",
            workload=WorkloadSpec(
                num_requests=128,
                num_tasks=16,
                prompt_len=(512, 512),
                output_len=(32, 64),
                concurrency=64,
                seed=1,
            ),
            runners=("engine", "no_prefix", "naive_peft", "static_batch"),
            max_batch_size=64,
            model_overrides=BART_OVERRIDES,
        ),
        slo=SLO(ttft_s=1.0, tpot_s=0.05),
    ),
}


def _flops(loaded: LoadedModel, workload: Workload, run: RunResult, with_prefix: bool) -> float:
    ok = [r for r in run.records if r.ok]
    prompts = [r.num_prompt_tokens for r in ok]
    outs = [r.num_output_tokens for r in ok]
    prefixes = [workload.prefix_length(r.task) if with_prefix and r.task else 0 for r in ok]
    if loaded.spec.is_encoder_decoder:
        return bart_flops(loaded.model, [p + 2 for p in prompts], outs, prefixes)  # + bos/eos
    return gpt2_flops(loaded.model, prompts, outs, prefixes)


def _fewer_tasks(
    workload: Workload, artifacts: dict[str, bytes], num_tasks: int
) -> tuple[Workload, dict[str, bytes]]:
    """The same requests spread round-robin over the first `num_tasks` tasks (same prompts, lengths)."""
    tasks = workload.tasks[:num_tasks]
    requests = [replace(r, task=tasks[i % len(tasks)]) for i, r in enumerate(workload.requests)]
    spec = replace(workload.spec, num_tasks=len(tasks))
    return replace(workload, spec=spec, tasks=tasks, requests=requests), {t: artifacts[t] for t in tasks}


def server_settings(runner: str, section: Section, loaded: LoadedModel) -> dict[str, str]:
    """PREFIXSERVE_* settings of a server runner: its engine backend, and for a section with small
    device tiers (`device_tier_prefixes`) the native prefix cache's and the vLLM prefix table's bytes,
    both sized in prefixes of the workload's longest prefix (so both backends hold as many)."""
    from server.limits import Limits

    settings = {"engine": SERVER_BACKENDS[runner]} if runner in SERVER_BACKENDS else {}
    if section.workload.num_tasks > Limits().tenant_max_tasks:  # one tenant uploads every task
        settings["tenant_max_tasks"] = str(section.workload.num_tasks)
    if section.device_tier_prefixes is not None:
        spec = loaded.spec
        positions = section.device_tier_prefixes * max(section.workload.prefix_lengths)
        itemsize = torch.empty((), dtype=loaded.dtype).element_size()
        nbytes = positions * spec.num_layers * 2 * spec.num_heads * spec.head_dim * itemsize
        settings["device_prefix_cache_bytes"] = str(nbytes)
        settings[VLLM_PREFIX_TABLE_SETTING] = str(nbytes)
    elif section.device_prefix_cache_bytes is not None:
        settings["device_prefix_cache_bytes"] = str(section.device_prefix_cache_bytes)
    return settings


class Bench:
    """Runs a profile's sections and collects everything that goes into the report."""

    def __init__(
        self, profile: Profile, out_dir: Path, models_dir: Path, runners: tuple[str, ...] | None
    ) -> None:
        self.profile = profile
        self.out_dir = out_dir
        self.models_dir = models_dir
        self.only = runners
        self.device = resolve_device(profile.device)
        self.notes: list[str] = []
        self.peak: dict[str, Any] = {}  # the profile dtype's matmul peak (measured in `main`)
        self._peaks: dict[str, dict[str, Any]] = {}  # other dtypes' (sections in another dtype)
        self.threads: int | None = None  # --threads: also the vLLM server's OpenMP threads
        # Called after each runner with its section's part so far and the notes (`main` writes
        # results.json then, so a run cut short keeps what it measured).
        self.checkpoint: Callable[[dict[str, Any], list[str]], None] | None = None

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _runners(self, section: Section) -> list[str]:
        return [r for r in section.runners if self.only is None or r in self.only]

    def run_section(
        self, section: Section, scratch: Path, do_scaling: bool
    ) -> tuple[dict[str, Any], dict[str, RunResult], list[str]]:
        from loadtest.runners.engine_runner import run_engine

        model_dir = ensure_model(section.preset, self.models_dir, section.model_overrides)
        dtype = section.dtype or self.profile.dtype
        loaded = load_model(str(model_dir), device=str(self.device), dtype=dtype)
        vocab = min(loaded.spec.vocab_size, GPT2_TEXT_VOCAB)
        workload = make_workload(section.workload, vocab, loaded.model.config.eos_token_id)
        lengths = {t: workload.prefix_length(t) for t in workload.tasks}
        with_peft = bool(set(PEFT_RUNNERS) & set(self._runners(section)))
        prefixes = make_task_prefixes(
            loaded, workload.tasks, lengths, scratch / section.preset / "peft", with_peft=with_peft
        )
        notes: list[str] = []
        runs: dict[str, RunResult] = {}
        engine_config = self._engine_config(section.max_batch_size, section.device_prefix_cache_bytes)
        if {"engine", "no_prefix"} & set(self._runners(section)):
            # One untimed pass first: the first engine of a process pays one-off costs (allocator
            # growth, page faults on the first KV buffers, thread-pool start) that would otherwise land
            # on whichever runner happens to go first.
            warm = replace(workload, requests=workload.requests[: min(8, len(workload.requests))])
            run_engine(loaded, warm, prefixes.artifacts, engine_config)
        # Engine-family runners and the scaling sweep first, the PEFT baselines last: PEFT wraps the
        # shared base model, and nothing measured on the engine should run after that.
        # transformers' own continuous batching goes last: it switches the model's attention implementation.
        order = sorted(
            self._runners(section), key=lambda r: (r in PEFT_RUNNERS) + 2 * (r == "transformers_cb")
        )
        scaling: list[dict[str, Any]] = []
        results: dict[str, dict[str, Any]] = {}
        for name in order:
            if name in (*PEFT_RUNNERS, "transformers_cb") and do_scaling and section.scaling and not scaling:
                scaling = self._scaling(loaded, section, prefixes.artifacts, vocab)
            self.log(f"{section.preset}: {name} ({len(workload.requests)} requests)")
            gc.collect()
            try:
                if name in ("engine", "no_prefix"):
                    runs[name] = run_engine(
                        loaded,
                        workload,
                        prefixes.artifacts,
                        engine_config,
                        name == "engine",
                        name,
                        max_warm_tasks=section.max_warm_tasks,
                    )
                elif name == "engine_16_tasks":
                    few, few_artifacts = _fewer_tasks(workload, prefixes.artifacts, section.compare_num_tasks)
                    runs[name] = run_engine(loaded, few, few_artifacts, engine_config, True, name)
                elif name == "transformers_cb":
                    from loadtest.runners.transformers_cb import run_transformers_cb

                    runs[name] = run_transformers_cb(loaded, workload, section.max_batch_size)
                elif name in ("http", *SERVER_BACKENDS):
                    from loadtest.runners.http_runner import run_http

                    log = self.out_dir / f"{name}-{section.name or section.preset}.log"
                    runs[name] = run_http(
                        str(model_dir),
                        workload,
                        prefixes.artifacts,
                        section.max_batch_size,
                        str(self.device),
                        dtype,
                        log,
                        name,
                        server_settings(name, section, loaded),
                        section.max_warm_tasks,
                        fields=schema_on_every_other if name in STRUCTURED_RUNNERS else None,
                        warm_fields=SCHEMA_FIELDS if name in STRUCTURED_RUNNERS else None,
                    )  # started as a user's default start: no vLLM environment variables of its own
                elif name in BART_BASELINES:
                    from loadtest.runners.bart_baselines import run_bart_baseline

                    runs[name] = run_bart_baseline(name, loaded, model_dir, workload, section.max_batch_size)
                elif name == "vllm_bare":
                    from loadtest.runners.vllm_bare import run_vllm_bare

                    log = self.out_dir / f"vllm_bare-{section.name or section.preset}.log"
                    runs[name] = run_vllm_bare(
                        str(model_dir),
                        workload,
                        section.max_batch_size,
                        str(self.device),
                        dtype,
                        log,
                        self.threads,
                    )
                else:
                    runs[name] = self._run_peft(
                        name, loaded, workload, prefixes.peft_dirs, section.max_batch_size
                    )
            except Exception as exc:  # report what ran; one broken runner must not hide the others
                note = f"{section.preset}: runner `{name}` failed: {type(exc).__name__}: {exc}"
                self.log(note)
                notes.append(note)
                continue
            self.log(
                f"  {name}: {runs[name].wall_s:.1f} s, {sum(r.num_output_tokens for r in runs[name].records)} tokens"
            )
            results[name] = self._summary(name, runs[name], loaded, workload, dtype)
            short = results[name]["num_short_outputs"]
            if short:
                notes.append(
                    f"{section.preset}: `{name}` stopped {short} request(s) before max_new_tokens (EOS)"
                )
            if self.checkpoint is not None:  # what ran so far, in case the run is cut short
                self.checkpoint(self._part(section, dtype, workload, results), notes)
        part = self._part(section, dtype, workload, results)
        if do_scaling and section.scaling and not scaling and "engine" in self._runners(section):
            scaling = self._scaling(loaded, section, prefixes.artifacts, vocab)
        if scaling:
            part["scaling"] = scaling
        del loaded
        gc.collect()
        return part, runs, notes

    def _summary(
        self, name: str, run: RunResult, loaded: LoadedModel, workload: Workload, dtype: str
    ) -> dict[str, Any]:
        """A runner's metrics, with the model FLOP/s its useful tokens took and their share of the peak."""
        summary = summarize(run, self.profile.slo)
        flops = _flops(loaded, workload, run, with_prefix=name not in ("no_prefix", "vllm_bare"))
        summary["model_flop_s"] = flops / run.wall_s if run.wall_s > 0 else None
        summary["fraction_of_peak"] = (
            summary["model_flop_s"] / self._peak(dtype)["flop_s"] if summary["model_flop_s"] else None
        )
        return summary

    @staticmethod
    def _part(
        section: Section, dtype: str, workload: Workload, results: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """A section's part of `results.json`: its workload, every runner's metrics, ratios, targets."""
        ratios = report.ratios(results)
        goals = dict(section.targets) if section.targets is not None else None
        return {
            "name": section.name,
            "model": f"{section.preset} ({dtype}, random weights)",
            "workload": workload.summary(),
            "results": results,
            "ratios": ratios,
            "targets": report.targets(ratios, goals),
        }

    def _peak(self, dtype: str) -> dict[str, Any]:
        """The matmul peak in `dtype`: a section in another dtype than the profile's is compared with its own."""
        if dtype == self.profile.dtype:
            return self.peak
        if dtype not in self._peaks:
            self._peaks[dtype] = measure_matmul_peak(self.device, DTYPES[dtype])
            self.log(f"matmul peak {self._peaks[dtype]['flop_s'] / 1e9:.1f} GFLOP/s ({dtype})")
        return self._peaks[dtype]

    def _engine_config(self, max_batch_size: int, device_prefix_cache_bytes: int | None = None) -> Any:
        from server.engine import EngineConfig
        from server.limits import Limits

        # Long queue timeouts: a benchmark measures queueing, it must not drop requests to hide it.
        limits = Limits(max_batch_size=max_batch_size, max_waiting=4096, queue_timeout_s=3600.0)
        if device_prefix_cache_bytes is not None:
            limits = replace(limits, device_prefix_cache_bytes=device_prefix_cache_bytes)
        return EngineConfig(limits)

    def _run_peft(
        self, name: str, loaded: LoadedModel, workload: Workload, peft_dirs: dict[str, Path], max_batch: int
    ) -> RunResult:
        from loadtest.runners.peft_runners import PeftBaseline, run_naive, run_static

        baseline = PeftBaseline(loaded, peft_dirs)
        try:
            return (
                run_naive(baseline, workload)
                if name == "naive_peft"
                else run_static(baseline, workload, max_batch)
            )
        finally:
            baseline.unload()

    def _scaling(
        self, loaded: LoadedModel, section: Section, artifacts: dict[str, bytes], vocab: int
    ) -> list[dict[str, Any]]:
        from loadtest.runners.engine_runner import run_engine

        points = []
        config = self._engine_config(max(section.scaling))
        for c in section.scaling:
            n = max(c, section.scaling_min_requests)
            spec = replace(section.workload, num_requests=n, concurrency=c, request_rate=0.0)
            workload = make_workload(spec, vocab, loaded.model.config.eos_token_id)
            self.log(f"{section.preset}: scaling, concurrency {c} ({n} requests)")
            run = run_engine(loaded, workload, artifacts, config)
            s = summarize(run, self.profile.slo)
            points.append(
                {
                    "runner": "engine",
                    "concurrency": c,
                    "num_requests": n,
                    "output_tok_s": s["output_tok_s"],
                    "requests_s": s["requests_s"],
                    "ttft_p50_s": s["ttft_p50_s"],
                    "tpot_p50_s": s["tpot_p50_s"],
                    "mean_batch_size": s.get("mean_batch_size"),
                }
            )
        return points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prefixserve bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, help="output directory (default bench-results/<profile>)")
    parser.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="cache of generated model dirs"
    )
    parser.add_argument("--runners", help=f"comma list, a subset of {','.join(ALL_RUNNERS)}")
    parser.add_argument("--no-scaling", action="store_true", help="skip the engine concurrency sweep")
    parser.add_argument("--no-bart", action="store_true", help="skip the BART section")
    parser.add_argument("--num-requests", type=int, help="override the main workload's request count")
    parser.add_argument("--concurrency", type=int, help="override the main workload's closed-loop clients")
    parser.add_argument(
        "--no-sections", action="store_true", help="run only the main section (no more sections)"
    )
    parser.add_argument(
        "--request-rate", type=float, help="Poisson arrivals at this rate instead of a closed loop"
    )
    parser.add_argument("--ttft-slo", type=float, help="goodput SLO: max TTFT (s)")
    parser.add_argument("--tpot-slo", type=float, help="goodput SLO: max TPOT (s)")
    parser.add_argument(
        "--profile-engine", action="store_true", help="also profile one engine run (see docs)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for every runner (the server subprocess too); default: torch's choice",
    )
    return parser.parse_args(argv)


def _customise(profile: Profile, args: argparse.Namespace) -> Profile:
    main = profile.main
    if args.num_requests:
        main = replace(main, workload=replace(main.workload, num_requests=args.num_requests))
    if args.concurrency:
        main = replace(main, workload=replace(main.workload, concurrency=args.concurrency))
    if args.request_rate:
        main = replace(main, workload=replace(main.workload, request_rate=args.request_rate, concurrency=0))
    slo = SLO(ttft_s=args.ttft_slo or profile.slo.ttft_s, tpot_s=args.tpot_slo or profile.slo.tpot_s)
    sections = () if args.no_sections else profile.sections
    return replace(
        profile, main=main, bart=None if args.no_bart else profile.bart, slo=slo, sections=sections
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = _customise(PROFILES[args.profile], args)
    out_dir = args.out or Path("bench-results") / profile.name
    out_dir.mkdir(parents=True, exist_ok=True)
    only = tuple(r.strip() for r in args.runners.split(",")) if args.runners else None
    if only and (unknown := set(only) - set(ALL_RUNNERS)):
        print(f"unknown runner(s) {sorted(unknown)}; choose from {ALL_RUNNERS}", file=sys.stderr)
        return 2
    if args.threads:
        # Same thread count everywhere: the HTTP server inherits it through OMP_NUM_THREADS.
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = resolve_device(profile.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"profile {profile.name!r} needs CUDA, and torch sees no GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    bench = Bench(profile, out_dir, args.models_dir, only)
    bench.threads = args.threads
    command = "prefixserve bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    machine = machine_info(device)
    load = machine.get("load_average_at_start")
    busy_note = None
    if load and machine["cores"] and load[0] > 0.5 * machine["cores"]:
        busy_note = (
            f"the machine was busy at the start (1-minute load average {load[0]:.1f} on {machine['cores']} cores): "
            "other processes competed for the CPU, so absolute numbers are low and noisy, and runners made of "
            "many small operations (naive_peft, static_batch) suffer most from thread oversubscription. "
            "Rerun on an idle machine before quoting these numbers."
        )
    bench.peak = measure_matmul_peak(device, DTYPES[profile.dtype])
    bench.log(f"matmul peak {bench.peak['flop_s'] / 1e9:.1f} GFLOP/s ({bench.peak['dtype']})")
    doc: dict[str, Any] = {
        "profile": profile.name,
        "command": command,
        "machine": machine,
        "slo": dataclasses.asdict(profile.slo),
        "flops": {
            "matmul_peak_flop_s": bench.peak["flop_s"],
            "matmul_dtype": bench.peak["dtype"],
            "matmul_size": bench.peak["size"],
            "formula": "forward matmul + attention FLOPs of the useful tokens (loadtest.machine)",
        },
        "notes": [busy_note] if busy_note else [],
    }
    sections: list[dict[str, Any]] = []

    def main_so_far(part: dict[str, Any], notes: list[str]) -> None:
        report.write_json(
            out_dir / "results.json", {**doc, **part, "notes": doc["notes"] + notes, "partial": True}
        )

    def section_so_far(part: dict[str, Any], notes: list[str]) -> None:
        report.write_json(
            out_dir / "results.json",
            {**doc, "sections": [*sections, {**part, "notes": notes}], "partial": True},
        )

    with tempfile.TemporaryDirectory(prefix="prefixserve-bench-") as scratch:
        bench.checkpoint = main_so_far
        part, runs, notes = bench.run_section(profile.main, Path(scratch), not args.no_scaling)
        doc.update({k: v for k, v in part.items() if k != "scaling"})
        doc["scaling"] = part.get("scaling", [])
        doc["notes"] = doc["notes"] + notes
        bench.checkpoint = section_so_far
        for section in profile.sections:
            more, _, more_notes = bench.run_section(section, Path(scratch), False)
            more["notes"] = more_notes
            sections.append(more)
        bench.checkpoint = None
        doc["sections"] = sections
        if profile.bart is not None:
            bart_part, bart_runs, bart_notes = bench.run_section(profile.bart, Path(scratch), False)
            if "engine" not in bart_runs:
                bart_notes.append("the BART engine runner did not run, so the engine ratios are not measured")
            bart_part["notes"] = bart_notes
            doc["bart"] = bart_part
        if args.profile_engine:
            from loadtest.profiling import profile_engine

            doc["engine_profile"] = profile_engine(
                profile.main, profile.dtype, device, args.models_dir, out_dir, Path(scratch)
            )
    # Recorded, not judged: the benchmark's own threads and server subprocess raise the load average.
    machine["load_average_at_end"] = list(os.getloadavg())
    doc["total_wall_s"] = time.perf_counter() - started
    report.write_json(out_dir / "results.json", doc)
    (out_dir / "report.md").write_text(report.markdown_report(doc))
    refs = {
        f"{name} (concurrency {profile.main.workload.effective_concurrency})": doc["results"][name][
            "output_tok_s"
        ]
        for name in ("naive_peft", "static_batch")
        if name in doc["results"]
    }
    report.plot_scaling(
        out_dir / "throughput_vs_concurrency.png",
        doc["scaling"],
        refs,
        f"{profile.main.preset}: output tokens/s",
    )
    report.plot_latency_cdf(out_dir / "latency_cdf.png", runs, f"{profile.main.preset}: latency per runner")
    bench.log(f"done in {doc['total_wall_s']:.0f} s; wrote {out_dir}/results.json, report.md and plots")
    print((out_dir / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

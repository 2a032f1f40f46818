"""`engine` and `no_prefix`: prefixserve's engine in-process, through its public API only.

Prefixes go into a `LocalPrefixStore` (as uploads would put them), and one short request per task
warms the engine and its prefix cache before the clock starts, as PEFT's adapters are preloaded too.
Closed loop: `concurrency` client coroutines each send their next request when the previous one
ends. Open loop: one coroutine per request, sleeping until its Poisson arrival time.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loadtest.machine import PeakMemory
from loadtest.metrics import RequestRecord, RunResult
from loadtest.runners.common import WARMUP_NEW_TOKENS, WARMUP_PROMPT_LEN, RunClock
from loadtest.workload import RequestSpec, Workload
from modeling.models import LoadedModel
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, EngineObserver, GenerationRequest, SamplingParams

TENANT = "bench"


def exact_length_params(max_new_tokens: int) -> SamplingParams:
    """Greedy with EOS ignored, so every runner generates exactly the requested tokens."""
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)


async def drive(
    workload: Workload, clock: RunClock, send: Callable[[RequestSpec, float], Awaitable[RequestRecord]]
) -> list[RequestRecord]:
    """Issue the workload's requests (open or closed loop) through `send(request, arrival)`."""
    spec = workload.spec
    requests = workload.requests
    if spec.request_rate > 0:

        async def at_arrival(req: RequestSpec) -> RequestRecord:
            await asyncio.sleep(max(0.0, req.arrival_s - clock.now()))
            return await send(req, clock.now())

        return list(await asyncio.gather(*(at_arrival(r) for r in requests)))

    queue: asyncio.Queue[RequestSpec] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    records: list[RequestRecord] = []

    async def client() -> None:
        while not queue.empty():
            req = queue.get_nowait()
            records.append(await send(req, clock.now()))

    await asyncio.gather(*(client() for _ in range(min(spec.effective_concurrency, len(requests)))))
    return sorted(records, key=lambda r: r.request_id)


class StepStats(EngineObserver):
    """Counts engine steps, their batch sizes and distinct tasks (to explain throughput)."""

    def __init__(self) -> None:
        self.enabled = False
        self.steps = 0
        self.rows = 0
        self.tasks = 0

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None:
        if self.enabled:
            self.steps += 1
            self.rows += batch_size
            self.tasks += num_distinct_tasks

    def summary(self) -> dict[str, Any]:
        return {
            "engine_steps": self.steps,
            "mean_batch_size": self.rows / self.steps if self.steps else None,
            "mean_tasks_per_step": self.tasks / self.steps if self.steps else None,
        }


async def _stream(
    engine: Engine, req: RequestSpec, task: str | None, arrival: float, clock: RunClock
) -> RequestRecord:
    rec = RequestRecord.of(req, task, arrival)
    request = GenerationRequest(
        request_id=req.request_id,
        prompt=list(req.prompt_ids),
        params=exact_length_params(req.max_new_tokens),
        tenant=TENANT,
        task=task,
    )
    try:
        async for event in engine.generate(request):
            if event.token_id is not None:
                rec.token_times.append(clock.now())
            if event.finish_reason is not None:
                rec.finish_reason = event.finish_reason
    except Exception as exc:  # a failed request is a result, not a crash of the benchmark
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = rec.token_times[-1] if rec.token_times else clock.now()
    return rec


async def run_engine_async(
    loaded: LoadedModel,
    workload: Workload,
    artifacts: dict[str, bytes],
    engine_config: EngineConfig,
    use_prefixes: bool = True,
    name: str = "engine",
    warm_tokens: int = 100,
    max_warm_tasks: int | None = None,
) -> RunResult:
    """Serve `workload` with a fresh engine; `use_prefixes=False` drops every task (no_prefix).

    `max_warm_tasks`: warm only that many tasks' prefixes before the clock starts (the many-task
    workload loads the rest through the store during the run, as a cold server would).
    """
    with tempfile.TemporaryDirectory(prefix="prefixserve-bench-store-") as root:
        store = LocalPrefixStore(Path(root))
        for task, data in artifacts.items():
            await store.put(TENANT, task, data, {"source": "loadtest"})
        stats = StepStats()
        engine = Engine(loaded, store, engine_config, observer=stats)
        await engine.start()
        try:
            warm_tasks: list[str | None] = list(artifacts)[:max_warm_tasks] if use_prefixes else [None]
            warm = [
                GenerationRequest(
                    f"warm-{i}",
                    [warm_tokens] * WARMUP_PROMPT_LEN,
                    exact_length_params(WARMUP_NEW_TOKENS),
                    TENANT,
                    t,
                )
                for i, t in enumerate(warm_tasks)
            ]
            await asyncio.gather(*(_drain(engine, w) for w in warm))
            stats.enabled = True
            engine.kv_stats(reset_peaks=True)
            with PeakMemory(loaded.device) as mem:
                clock = RunClock()

                def send(req: RequestSpec, arrival: float) -> Awaitable[RequestRecord]:
                    return _stream(engine, req, req.task if use_prefixes else None, arrival, clock)

                records = await drive(workload, clock, send)
                wall = clock.now()
            stats.enabled = False
            kv = engine.kv_stats()
            cache = engine.prefix_cache_stats
            extra: dict[str, Any] = {
                "max_batch_size": engine_config.limits.max_batch_size,
                **stats.summary(),
                "peak_kv_bytes": kv.get("peak_bytes"),
                "peak_prefix_bytes": kv.get("peak_prefix_bytes"),
                "prefix_loads": None if cache is None else cache.loads,
            }
        finally:
            await engine.stop()
    return RunResult(name, records, wall, mem.peak_rss_bytes, mem.peak_device_bytes, extra=extra)


async def _drain(engine: Engine, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


def run_engine(
    loaded: LoadedModel,
    workload: Workload,
    artifacts: dict[str, bytes],
    engine_config: EngineConfig,
    use_prefixes: bool = True,
    name: str = "engine",
    max_warm_tasks: int | None = None,
) -> RunResult:
    return asyncio.run(
        run_engine_async(
            loaded, workload, artifacts, engine_config, use_prefixes, name, max_warm_tasks=max_warm_tasks
        )
    )

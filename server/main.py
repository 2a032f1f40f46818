"""`python -m server.main` / `prefixserve serve`: load the model, build store + engine + app, run uvicorn.

Settings come from the environment (`PREFIXSERVE_*`, see `server.settings`); a few common ones can be
overridden on the command line. Shutdown:

- SIGTERM / SIGINT: readiness turns false at once and new generation requests get 503, while the server
  keeps listening (so probes and requests routed before the endpoint is removed get an answer, not a
  refused connection). In-flight generations run until done or until `shutdown_grace_s` has passed; what
  is still running then is cancelled (its stream ends early). Then uvicorn stops accepting connections,
  the lifespan stops the engine and closes the store. Exit status 0. A second signal stops at once.
- The engine loop dies: readiness false, then the same shutdown, exit status 1 (so the orchestrator
  restarts the pod).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from server.http_protocol import with_deadlines
from server.logging import configure_logging
from server.settings import Settings
from server.train_workers import EmbeddedWorkers

if TYPE_CHECKING:  # the engine (torch) is imported lazily: `--help` and config errors stay fast
    from modeling.models import LoadedModel
    from prefix_store.base import PrefixStore
    from server.engine import EngineConfig
    from server.engine.frontend import EngineFrontEnd
    from server.engine.native_backend import NativeOptions
    from server.metrics import Metrics

logger = logging.getLogger("prefixserve.main")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_ENGINE_FAILED = 1
# After the drain, only the last bytes of responses are left to send: uvicorn waits at most this long.
FINAL_FLUSH_S = 5


def parse_args(argv: list[str] | None) -> dict[str, object]:
    """Command-line overrides of settings (only the ones given)."""
    parser = argparse.ArgumentParser(
        prog="prefixserve serve",
        description="Serve prefix-tuned tasks over HTTP (settings: PREFIXSERVE_* env).",
    )
    parser.add_argument("--model", help="local HF model directory (PREFIXSERVE_MODEL)")
    parser.add_argument("--host", help="bind address (PREFIXSERVE_HOST)")
    parser.add_argument("--port", type=int, help="port (PREFIXSERVE_PORT)")
    parser.add_argument("--device", help="auto | cpu | cuda (PREFIXSERVE_DEVICE)")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (PREFIXSERVE_DTYPE)")
    parser.add_argument("--redis-url", dest="redis_url", help="Redis URL (PREFIXSERVE_REDIS_URL)")
    parser.add_argument("--log-level", dest="log_level", help="PREFIXSERVE_LOG_LEVEL")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


class _Server(uvicorn.Server):
    """uvicorn, plus: drain on the first signal (still listening), and exit 0 after a graceful SIGTERM.

    uvicorn re-raises a captured signal after shutting down (so the process dies *by* SIGTERM, status
    143). A completed graceful shutdown is a success, so we record the signal but do not re-raise it.
    """

    def __init__(self, config: uvicorn.Config, on_signal: object, engine: object, grace_s: float) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._engine = engine
        self._grace_s = grace_s
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is None:  # first signal: drain; main_loop's on_tick decides when to stop
            if callable(self._on_signal):
                self._on_signal()
            self._drain_deadline = time.monotonic() + self._grace_s
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # another Ctrl-C: stop waiting for connections
        self.should_exit = True  # a second signal: stop draining now

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            engine = self._engine
            idle = getattr(engine, "num_running", 0) == 0 and getattr(engine, "num_waiting", 0) == 0
            if not idle and time.monotonic() >= self._drain_deadline:
                logger.warning("shutdown grace of %ss spent; cancelling in-flight generations", self._grace_s)
                await engine.stop(drain_timeout_s=0)  # type: ignore[attr-defined]
            if idle or time.monotonic() >= self._drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's config: the settings' one `Limits` object (read once, at the edge)."""
    from server.engine import EngineConfig
    from server.engine.fair_queue import FairQueueConfig

    weights, bounds = settings.tenant_weights()
    return EngineConfig(
        limits=settings.limits,
        fair_queue=FairQueueConfig(
            enabled=settings.fair_scheduling,
            tenant_weights=weights,
            tenant_max_waiting=bounds,
            default_max_waiting=settings.limits.tenant_max_waiting,
        ),
    )


def native_options(settings: Settings) -> NativeOptions:
    """How our own engine runs (its KV block, CUDA graphs, torch.compile)."""
    from server.engine.native_backend import NativeOptions

    return NativeOptions(
        kv_block_size=settings.kv_block_size,
        cuda_graphs=settings.cuda_graphs,
        torch_compile=settings.torch_compile,
    )


def build_engine(
    settings: Settings, loaded: LoadedModel, store: PrefixStore, observer: Metrics
) -> EngineFrontEnd:
    """The engine `settings.engine` asks for: vLLM or ours, the same public API and the same
    observer hooks. `auto` logs once why it did not pick vLLM; `vllm` raises `EngineError` if it cannot."""
    from server.engine import Engine
    from server.vllm_backend.support import choose_backend

    backend, why_not = choose_backend(settings.engine, loaded)
    ignored = settings.ignored_by(backend)
    if ignored:
        logger.warning(
            "engine: %s ignores %s (the other engine backend's settings)",
            "vLLM" if backend == "vllm" else "native",
            ", ".join(ignored),
            extra={"engine": backend},
        )
    if backend == "vllm":
        from server.vllm_backend.engine import VllmEngine, VllmOptions

        assert settings.model is not None
        logger.info("engine: vLLM", extra={"engine": "vllm"})
        vllm_options = VllmOptions(
            model_dir=settings.model,
            block_size=settings.vllm_block_size,
            enforce_eager=settings.vllm_enforce_eager,
            cuda_graph_mode=settings.vllm_cuda_graph_mode,
            cpu_threads=settings.vllm_cpu_threads,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            data_parallel_size=settings.vllm_data_parallel_size,
        )
        vllm_options.check()
        return VllmEngine(loaded, store, engine_config(settings), observer=observer, options=vllm_options)
    if why_not is not None:
        logger.info("engine: native (not vLLM: %s)", why_not, extra={"engine": "native"})
    return Engine(loaded, store, engine_config(settings), observer=observer, options=native_options(settings))


def release_model_weights(engine: Any, loaded: LoadedModel) -> None:
    """On the vLLM backend, vLLM's engine core process loads the weights itself, and this process needs
    only the model's spec (its weights digest was taken at load) and tokenizer: the HF copy would double
    the model's memory, so its parameters are dropped (moved to the meta device)."""
    if getattr(engine, "backend", None) != "vllm":
        return
    import torch

    torch.nn.Module.to(loaded.model, "meta")  # PreTrainedModel.to's wrapper hides the overloads from mypy
    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the freed blocks back, for vLLM's engine core in its own process


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    """uvicorn with the connection limits of `settings.limits`: idle keep-alive connections close,
    headers must arrive in time (slowloris), header size and open connections are bounded."""
    limits = settings.limits
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our structured logging
        access_log=False,  # our RequestMiddleware writes the access line
        timeout_graceful_shutdown=FINAL_FLUSH_S,  # the grace itself is spent draining (see _Server)
        lifespan="on",
        http=with_deadlines(limits),
        timeout_keep_alive=limits.timeout_keep_alive_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_request_header_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit status."""
    try:
        settings = Settings(**parse_args(argv))  # type: ignore[arg-type]
        api_keys = settings.resolve_api_keys()
        settings.tenant_weights()  # keys of one tenant must agree on its share
    except (ValidationError, ValueError) as exc:
        print(f"prefixserve: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    if not settings.model:
        logger.error("no model: set PREFIXSERVE_MODEL (or --model) to a local HF model directory")
        return EXIT_CONFIG
    del api_keys  # validated here for a clear start-up error; the app resolves them again

    # Imported here: torch and transformers take seconds to import, and `--help` should not wait.
    from modeling.models import load_model
    from prefix_store.factory import make_store
    from prefix_store.uploads import ArtifactUploadChecks
    from server.api import create_app, metrics_for, start_draining
    from server.engine import EngineError

    logger.info("loading model", extra={"model": settings.model, "device": settings.device})
    try:
        loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    except Exception as exc:
        logger.error("could not load the model %r: %s", settings.model, exc)
        return EXIT_CONFIG
    store = make_store(
        settings.redis_url, settings.local_store_dir, settings.redis_key_prefix, settings.limits.keep_versions,
        min_replicas=settings.redis_min_replicas, replication_timeout_s=settings.redis_replication_timeout_s,
        call_timeout_s=settings.limits.store_timeout_s,
    )  # fmt: skip
    metrics = metrics_for(settings, loaded.spec)  # the engine's observer, then the app's metrics
    try:
        engine = build_engine(settings, loaded, store, metrics)
    except EngineError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    release_model_weights(engine, loaded)
    exit_code = EXIT_OK
    server: _Server | None = None

    def on_fatal() -> None:
        nonlocal exit_code
        exit_code = EXIT_ENGINE_FAILED
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings, engine=engine, store=store, spec=loaded.spec, uploads=ArtifactUploadChecks(loaded.dtype if settings.store_served_dtype else None),
        device_type=loaded.device.type, metrics=metrics, on_fatal=on_fatal,
    )  # fmt: skip
    config = uvicorn_config(app, settings)
    server = _Server(
        config, on_signal=lambda: start_draining(app), engine=engine, grace_s=settings.limits.shutdown_grace_s
    )
    # Fine-tuning jobs train in worker processes beside the server (the embedded default; a fleet
    # runs them as their own Deployment and sets PREFIXSERVE_TRAIN_WORKERS=0).
    workers = EmbeddedWorkers(settings, settings.embedded_train_workers()).start()
    try:
        server.run()
    finally:
        workers.stop()
    if not server.started and exit_code == EXIT_OK:
        return EXIT_ENGINE_FAILED  # start-up failed (e.g. port in use); uvicorn logged why
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

"""The app factory: `create_app(settings, engine=..., store=..., spec=...)`.

The caller (`server.main`, or a test) builds the engine and the store; the app's lifespan starts and
stops them: store first up and last down, so the engine can load prefixes while it runs and drain
while the store is still there. Two background tasks run alongside: an engine watchdog (the engine
loop died → readiness false and `on_fatal()` so the process exits non-zero and is restarted) and a
store probe that keeps `prefixserve_store_up` true to the store's state when no traffic touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI

from modeling.model_spec import ModelSpec
from prefix_store.artifact_types import UploadChecks
from prefix_store.background import stop_tasks
from prefix_store.base import PrefixStore, StoreUnavailable
from server.api.admission import AdmissionMiddleware
from server.api.auth import Authenticator
from server.api.deps import ApiConfig, AppState
from server.api.errors import install_error_handlers
from server.api.fine_tuning.publisher import start as start_fine_tuning
from server.api.fine_tuning.service import attach as attach_fine_tuning
from server.api.generation import prompt_char_limit
from server.api.middleware import RequestMiddleware
from server.api.ratelimit import LimitConfig, TenantLimiter, make_limiter
from server.api.routes import canary, chat, files, fine_tuning, generate, health, openai, prefixes, tokenize
from server.api.version import __version__
from server.api.warm_start import warm_start
from server.engine.chat_render import ChatRenderPool, RenderLimits
from server.engine.interface import ServingEngine
from server.metrics import Metrics
from server.settings import Settings

logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 0.5
STORE_PROBE_INTERVAL_S = 10.0


def model_id_for(settings: Settings) -> str:
    """The base model's id in /v1/models: `served_model_name`, else the model directory's name."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model:
        return Path(settings.model.rstrip("/")).name or settings.model
    return "base"


def metrics_for(settings: Settings, spec: ModelSpec | None = None) -> Metrics:
    """The metrics of a server with `settings`: its task labels, its tenants, its batch size; with the
    model's `spec`, vLLM's length histograms reach its positions (vLLM: max_model_len)."""
    return Metrics(
        settings.metrics_task_labels,
        settings.metrics_top_tasks,
        Authenticator(settings.resolve_api_keys()).tenants,
        max_tasks=settings.limits.max_batch_size,
        model_name=model_id_for(settings),
        adapter_names=settings.metrics_adapter_names,
        version=__version__,
        max_model_len=spec.max_positions if spec is not None else 1024,
        # vLLM's CacheConfig fields that mean something here; prefix caching is vLLM's automatic
        # reuse of prompt KV across requests, which this engine does not do (task prefixes aside).
        cache_info={
            "block_size": str(settings.kv_block_size),
            "cache_dtype": settings.dtype,
            "enable_prefix_caching": "False",
        },
    )


def create_app(
    settings: Settings,
    *,
    engine: ServingEngine,
    store: PrefixStore,
    spec: ModelSpec,
    uploads: UploadChecks,
    device_type: str = "cpu",
    metrics: Metrics | None = None,
    limiter: TenantLimiter | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the FastAPI app serving `engine` and `store` with `settings`.

    `uploads` checks uploaded files (`prefix_store.uploads.ArtifactUploadChecks()`: tensor code, so it is
    passed in rather than imported; this layer imports no torch). `metrics` should be the engine's observer (so engine and HTTP metrics share a registry), built by
    `metrics_for(settings)`; one is made if not given. `on_fatal` is called once if the engine loop
    dies (main: exit non-zero).
    """
    auth = Authenticator(settings.resolve_api_keys())
    if metrics is None:
        metrics = metrics_for(settings, spec)
    metrics.bind_engine(engine)
    if limiter is None:
        limiter = make_limiter(
            LimitConfig(settings.limits.tenant_max_concurrent, settings.limits.tenant_rps),
            settings.redis_url,
            settings.redis_key_prefix,
        )
    upload_limiter = make_limiter(
        LimitConfig(max_concurrent=0, rps=settings.limits.tenant_upload_rps),
        settings.redis_url,
        f"{settings.redis_key_prefix}:uploads",
    )
    state = AppState(
        config=ApiConfig(
            model_id=model_id_for(settings),
            model_dtype=settings.dtype,
            device_type=device_type,
            limits=settings.limits,
            chat_template=settings.read_chat_template(),
        ),
        engine=engine,
        store=store,
        spec=spec,
        metrics=metrics,
        auth=auth,
        uploads=uploads,
        limiter=limiter,
        upload_limiter=upload_limiter,
        max_prompt_chars=prompt_char_limit(
            settings.limits, spec.max_positions, getattr(engine, "tokenizer", None)
        ),
        chat_renderer=ChatRenderPool(
            RenderLimits(
                workers=settings.limits.chat_template_workers,
                timeout_s=settings.limits.chat_template_timeout_s,
                memory_bytes=settings.limits.chat_template_max_memory_bytes,
                wait_s=settings.limits.queue_timeout_s,
            )
        ),
    )
    jobs = attach_fine_tuning(settings, state)  # training files and jobs (trained by worker processes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if auth.single_tenant:
            logger.warning("no API keys configured: single-tenant mode, every request is tenant 'default'")
        await store.start()
        await engine.start()
        # Before readiness (uvicorn listens once start-up is done): load the most used tasks, bounded
        # in time and memory (`warm_start`); never fails start-up.
        await warm_start(
            engine, store, metrics, settings.limits.warm_start_tasks, settings.limits.warm_start_timeout_s
        )
        await start_fine_tuning(jobs)
        state.started = True
        state.background = [
            asyncio.create_task(_watchdog(state, on_fatal), name="prefixserve-watchdog"),
            asyncio.create_task(_probe_store(state), name="prefixserve-store-probe"),
        ]
        logger.info("ready", extra={"model_id": state.config.model_id})
        try:
            yield
        finally:
            state.draining = True
            await stop_tasks(state.background)
            await engine.stop(drain_timeout_s=settings.limits.shutdown_grace_s)
            await jobs.close()
            await store.close()
            await limiter.close()
            await upload_limiter.close()
            await state.chat_renderer.close()
            logger.info("stopped")

    app = FastAPI(
        title="prefixserve",
        version=__version__,
        description="Many prefix-tuned tasks over one frozen model, in shared batches. "
        "TGI- and OpenAI-compatible generation, prefix management, metrics.",
        lifespan=lifespan,
    )
    app.state.prefixserve = state
    install_error_handlers(app)
    for module in (generate, openai, chat, tokenize, prefixes, canary, files, fine_tuning, health):
        app.include_router(module.router)
    # add_middleware wraps: the last added is outermost. RequestMiddleware must see everything
    # (including 413s) to stamp the request id and log.
    app.add_middleware(AdmissionMiddleware, state=state)
    app.add_middleware(RequestMiddleware, metrics=metrics)
    return app


def start_draining(app: FastAPI) -> None:
    """SIGTERM: readiness false now, new generations get 503; in-flight ones continue."""
    app.state.prefixserve.draining = True


async def _watchdog(state: AppState, on_fatal: Callable[[], None] | None) -> None:
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        if not state.engine.healthy and not state.draining:
            failure = getattr(state.engine, "failure", None)
            logger.error(
                "engine loop died; exiting so the orchestrator restarts us", extra={"failure": repr(failure)}
            )
            state.draining = True
            if on_fatal is not None:
                on_fatal()
            return


async def _probe_store(state: AppState) -> None:
    while True:
        try:
            await state.store.list_tasks("default", None, 1)
            state.metrics.observe_store("probe", ok=True)
        except StoreUnavailable:
            state.metrics.observe_store("probe", ok=False)
        except Exception:
            logger.exception("store probe failed")
        await asyncio.sleep(STORE_PROBE_INTERVAL_S)

"""API test fixtures: a real tiny GPT-2, a real engine, real stores (local dir; Redis where named).

The engine backend is the native one, or vLLM's with `PREFIXSERVE_TEST_ENGINE=vllm` (`make test` runs
the API tests a second time that way when vLLM is installed; `make test-vllm` alone): then the
model is the tiny GPT-2 with head_dim 32 (vLLM's CPU attention needs it), one vLLM core (`VllmCore`:
~30-60 s to start on the shared 2-core machine) serves the whole session, and every `make_api` builds
a fresh `VllmEngine` over it. vLLM's engine-core client binds to one event loop, so that pass runs every
test and fixture on the session's loop (`VLLM_PYTEST_ARGS`, checked in `pytest_configure`).

`make_api(...)` builds an app with the given setting overrides, runs its lifespan (store + engine
start/stop) and returns an httpx client bound to it in-process (ASGI transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch

from modeling.model_spec import ModelSpec
from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import dump_artifact, new_artifact
from prefix_store.base import PrefixStore
from prefix_store.factory import make_store
from prefix_store.uploads import ArtifactUploadChecks
from server.api import create_app, metrics_for
from server.engine import Engine, EngineConfig
from server.limits import Limits
from server.metrics import Metrics
from server.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

KEYS = {
    "acme-manage-key": {"tenant": "acme", "role": "manage"},
    "acme-generate-key": {"tenant": "acme", "role": "generate"},
    "globex-manage-key": {"tenant": "globex", "role": "manage"},
}
ACME = {"Authorization": "Bearer acme-manage-key"}
ACME_GEN = {"Authorization": "Bearer acme-generate-key"}
GLOBEX = {"Authorization": "Bearer globex-manage-key"}


TEST_ENGINE = os.environ.get("PREFIXSERVE_TEST_ENGINE", "native")
VLLM_PYTEST_ARGS = "-o asyncio_default_test_loop_scope=session -o asyncio_default_fixture_loop_scope=session"
if TEST_ENGINE == "vllm":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def pytest_configure(config: pytest.Config) -> None:
    if TEST_ENGINE != "vllm":
        return
    scopes = [config.getini(f"asyncio_default_{kind}_loop_scope") for kind in ("test", "fixture")]
    if scopes != ["session", "session"]:
        raise pytest.UsageError(
            "PREFIXSERVE_TEST_ENGINE=vllm shares one vLLM core, bound to one event loop: run pytest with "
            + VLLM_PYTEST_ARGS
        )


@pytest.fixture(scope="session")
def api_model_dir(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model the API tests serve: the tiny GPT-2 (head_dim 32 on the vLLM backend, with a large
    init: peaked distributions, so greedy choices have clear margins, as the eval-harness test needs)."""
    if TEST_ENGINE == "vllm":
        return make_model_dir(
            "tiny-gpt2-h32", tmp_path_factory.mktemp("tiny-gpt2-h32"), seed=0, initializer_range=0.3
        )
    return tiny_gpt2_dir


@pytest.fixture(scope="session")
def loaded(api_model_dir: Path) -> LoadedModel:
    return load_model(str(api_model_dir), device="cpu", dtype="float32")


if TEST_ENGINE == "vllm":

    @pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def vllm_core(api_model_dir: Path) -> AsyncIterator[Any]:
        """The session's one vLLM core; each app's engine is built over it (`build_test_engine`).
        It loads the model itself: a module may override `loaded` (same files, narrower scope)."""
        from server.vllm_backend.core import VllmCore, VllmOptions

        model = load_model(str(api_model_dir), device="cpu", dtype="float32")
        # Wider than any test's batch: each engine's own scheduler bounds what enters vLLM.
        limits = Limits(max_batch_size=16)
        core = VllmCore.start(model, limits, VllmOptions(model_dir=str(api_model_dir), enforce_eager=True))
        yield core
        core.shutdown()

else:

    @pytest.fixture(scope="session")
    def vllm_core() -> None:
        return None


def build_test_engine(
    loaded: LoadedModel,
    model_dir: Path,
    store: PrefixStore,
    config: EngineConfig,
    observer: Metrics,
    core: Any = None,
    native: bool = False,
) -> Any:
    """The backend `PREFIXSERVE_TEST_ENGINE` names, built as `server.main` builds it. On vLLM the engine
    runs on `core` (shared), or starts a core of its own on the loop that starts it when none is given.
    `native`: our engine whatever the pass (BART: vLLM cannot serve it)."""
    if TEST_ENGINE == "vllm" and not native:
        from server.vllm_backend.engine import VllmEngine, VllmOptions

        options = VllmOptions(model_dir=str(model_dir), enforce_eager=True)
        return VllmEngine(loaded, store, config, observer=observer, options=options, core=core)
    return Engine(loaded, store, config, observer=observer)


def artifact_bytes(spec: ModelSpec, seed: int, length: int = 4, scale: float = 3.0) -> bytes:
    """A valid decoder prefix for `spec`; large values so different seeds steer output differently."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(spec.num_layers, 2, spec.num_heads, length, spec.head_dim, generator=g) * scale
    return dump_artifact(new_artifact({"decoder": prefix}, spec, task=f"t{seed}"))


@dataclass
class Api:
    client: httpx.AsyncClient
    app: Any
    engine: Engine
    store: PrefixStore
    metrics: Metrics
    settings: Settings

    async def upload(self, task: str, data: bytes, headers: dict[str, str] = ACME) -> httpx.Response:
        files = {"artifact": ("prefix.safetensors", data, "application/octet-stream")}
        return await self.client.post("/v1/prefixes", data={"task": task}, files=files, headers=headers)

    async def generate(
        self, inputs: str = "Hello world", task: str | None = None, headers=ACME, **params: Any
    ):
        body = {
            "task": task,
            "inputs": inputs,
            "parameters": {"max_new_tokens": 8, "details": True, **params},
        }
        return await self.client.post("/v1/generate", json=body, headers=headers)


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(
    loaded: LoadedModel, api_model_dir: Path, tmp_path: Path, vllm_core: Any
) -> AsyncIterator[MakeApi]:
    """Factory of running apps; everything is stopped (and Redis keys removed) at teardown."""
    async with AsyncExitStack() as stack:
        prefixes: list[str] = []

        async def make(
            store: PrefixStore | None = None,
            engine_config: EngineConfig | None = None,
            keys: dict[str, Any] | None = KEYS,
            redis: bool = False,
            start: bool = True,
            on_fatal: Callable[[], None] | None = None,
            serve_model: tuple[LoadedModel, Path] | None = None,
            **overrides: Any,
        ) -> Api:
            """`serve_model`: (loaded, its directory) to serve instead of the session's GPT-2, on our engine
            (BART, which vLLM cannot serve)."""
            served, served_dir = serve_model or (loaded, api_model_dir)
            key_prefix = overrides.pop("redis_key_prefix", None) or f"pstest-{uuid.uuid4().hex[:10]}"
            prefixes.append(key_prefix)
            fields: dict[str, Any] = {
                "model": "tiny-gpt2",
                "local_store_dir": tmp_path / f"store-{len(prefixes)}",
                "redis_key_prefix": key_prefix,
                "api_keys": json.dumps(keys) if keys else None,
                "log_format": "text",
                "shutdown_grace_s": 5.0,
                **overrides,
            }
            if redis:
                fields.setdefault("redis_url", REDIS_URL)
            settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
            if store is None:
                store = make_store(
                    settings.redis_url, settings.local_store_dir, key_prefix, settings.keep_versions
                )
            metrics = metrics_for(settings, served.spec)
            engine = build_test_engine(
                served,
                served_dir,
                store,
                engine_config or EngineConfig(Limits(max_batch_size=8, max_waiting=16, queue_timeout_s=30)),
                metrics,
                vllm_core,
                native=serve_model is not None,
            )
            app = create_app(
                settings,
                engine=engine,
                store=store,
                spec=served.spec,
                uploads=ArtifactUploadChecks(),
                metrics=metrics,
                on_fatal=on_fatal,
            )
            if start:  # else the caller runs the lifespan (e.g. a real uvicorn server)
                await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
            await stack.enter_async_context(client)
            return Api(client, app, engine, store, metrics, settings)

        yield make
    await _cleanup_redis(prefixes)


async def _cleanup_redis(prefixes: list[str]) -> None:
    from redis.asyncio import Redis

    try:
        redis = Redis.from_url(REDIS_URL, socket_timeout=2)
        for prefix in prefixes:
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=500)]
            if keys:
                await redis.delete(*keys)
        await redis.aclose()
    except Exception:
        pass


def serve_http(api: Api) -> contextlib.AbstractAsyncContextManager[str]:
    """Serve `api` (made with `start=False`) with uvicorn on a free loopback port; yields its URL."""
    return serve_asgi(api.app)


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields its URL.

    Real HTTP, so streams arrive event by event (httpx's ASGI transport buffers whole responses).
    uvicorn runs the app's lifespan; it shares this event loop with the engine loop.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + (300 if TEST_ENGINE == "vllm" else 30)  # vLLM: its start
    while not server.started:
        assert not serving.done(), "uvicorn exited during start-up"
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=30)
        sock.close()


@contextlib.contextmanager
def serve_http_in_thread(app: Any) -> Iterator[str]:
    """`serve_asgi` on an event loop of its own in a background thread, for synchronous callers (the
    engine loop needs one long-lived event loop; a sync client would otherwise have none running)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving = serve_asgi(app)
    try:
        url = asyncio.run_coroutine_threadsafe(serving.__aenter__(), loop).result(timeout=360)
        try:
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(serving.__aexit__(None, None, None), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)

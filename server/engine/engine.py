"""`Engine`: the engine front end over our own model backend (continuous batching of mixed-task rows).

The request path (admission, queue, prefixes, detokenizer, events, metrics) is the front end's
(`frontend.py`); the model's is `native_backend.py`. This module only puts the two together, so that
`Engine(loaded, store, config)` is the whole engine, as `server.vllm_backend.engine.VllmEngine` is over
vLLM.
"""

from __future__ import annotations

from typing import Any

from modeling.models import LoadedModel
from prefix_store.base import PrefixStore
from server.engine.frontend import EngineConfig, EngineFrontEnd
from server.engine.native_backend import NativeBackend, NativeOptions
from server.engine.observer import EngineObserver
from server.engine.runner import ModelRunner

__all__ = ["Engine", "EngineConfig", "NativeOptions"]


class Engine(EngineFrontEnd):
    """The front end over `NativeBackend` (`runner` replaces the model family's default runner)."""

    model: NativeBackend

    def __init__(
        self,
        loaded: LoadedModel,
        store: PrefixStore | None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        runner: ModelRunner | None = None,
        options: NativeOptions | None = None,
    ) -> None:
        config = config or EngineConfig()
        backend = NativeBackend(loaded, config.limits, options, runner)
        super().__init__(loaded, store, backend, config, observer)
        backend.bind(self.prefix_cache)

    @property
    def runner(self) -> ModelRunner:
        return self.model.runner

    @property
    def debug_logits_hook(self) -> Any:
        """Called in the worker thread with (request ids, logits [N, V]) of every step (tests)."""
        return self.model.debug_logits_hook

    @debug_logits_hook.setter
    def debug_logits_hook(self, hook: Any) -> None:
        self.model.debug_logits_hook = hook

"""The inference engine: continuous batching of many tasks' prefixes over one frozen model.

Public API (what the API layer and loadtest use): `Engine`, `EngineConfig`, `EngineObserver`,
`SamplingParams`, `GenerationRequest`, `StreamEvent`, `RequestHandle` (what `Engine.add_request`
returns) and the errors below. Nothing here imports
fastapi or redis; `Engine`, `EngineConfig` and `PrefixCacheStats` (torch) load on first use.
"""

from typing import TYPE_CHECKING, Any

# Torch-free parts, imported eagerly: the API layer uses them without loading torch.
from server.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidPrefix,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    RequestFailed,
    StoreUnavailable,
    UnknownTask,
)
from server.engine.handle import RequestHandle
from server.engine.observer import EngineObserver
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, StreamEvent

if TYPE_CHECKING:
    from server.engine.engine import Engine, EngineConfig
    from server.engine.prefix_cache import PrefixCacheStats

# The torch parts load on first use, so `import server.engine.types` (which runs this file) stays light.
_LAZY = {
    "Engine": "server.engine.engine",
    "EngineConfig": "server.engine.engine",
    "PrefixCacheStats": "server.engine.prefix_cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'server.engine' has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineStopped",
    "FinishReason",
    "GenerationRequest",
    "InvalidPrefix",
    "InvalidRequest",
    "PrefixCacheStats",
    "PromptTooLong",
    "QueueFull",
    "QueueTimeout",
    "RequestFailed",
    "RequestHandle",
    "SamplingParams",
    "StoreUnavailable",
    "StreamEvent",
    "UnknownTask",
]

"""The inference engine: continuous batching of many tasks' prefixes over one frozen model.

Public API (what the API layer and loadtest use): `Engine`, `EngineConfig`, `EngineObserver`,
`SamplingParams`, `GenerationRequest`, `StreamEvent` and the errors below. Nothing here imports
fastapi or redis.
"""

from server.engine.engine import Engine, EngineConfig, EngineObserver
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
from server.engine.prefix_cache import PrefixCacheStats
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, StreamEvent

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
    "SamplingParams",
    "StoreUnavailable",
    "StreamEvent",
    "UnknownTask",
]

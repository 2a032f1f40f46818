"""Errors the engine raises to its callers (the API layer maps each one to an HTTP status).

`StoreUnavailable` is the prefix store's own exception class, re-exported, so callers catch one type
whether the store or the engine raised it.
"""

from __future__ import annotations

from prefix_store.base import StoreUnavailable

__all__ = [
    "EngineError",
    "EngineStopped",
    "InvalidConstraint",
    "InvalidPrefix",
    "InvalidRequest",
    "PromptTooLong",
    "QueueFull",
    "QueueTimeout",
    "RequestFailed",
    "StoreUnavailable",
    "UnknownTask",
]


class EngineError(Exception):
    """Base class of the engine's own errors."""


class InvalidRequest(EngineError, ValueError):
    """A request parameter is out of range (the message names it)."""


class InvalidConstraint(InvalidRequest):
    """A structured-output constraint that cannot be served as asked: an invalid JSON schema, a keyword
    the grammar library cannot enforce, a regex or grammar that does not compile (or not within the
    compile bounds), two constraints at once. The message names the reason."""


class PromptTooLong(InvalidRequest):
    """prefix length + prompt tokens + max_new_tokens exceed what the model (or the KV budget) holds."""

    def __init__(self, num_prompt_tokens: int, prefix_length: int, max_new_tokens: int, limit: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.prefix_length = prefix_length
        self.max_new_tokens = max_new_tokens
        self.limit = limit
        total = num_prompt_tokens + prefix_length + max_new_tokens
        super().__init__(
            f"request needs {total} positions: {num_prompt_tokens} prompt tokens + prefix length "
            f"{prefix_length} + max_new_tokens {max_new_tokens}, but the model's limit is {limit}"
        )


class UnknownTask(EngineError, LookupError):
    """The tenant has no such task in the prefix store (or the engine runs without a store)."""


class InvalidPrefix(EngineError):
    """The store returned an artifact that does not fit the served model (message from the validator)."""


class QueueFull(EngineError):
    """The waiting queue holds `max_waiting` requests already; retry later."""


class QueueTimeout(EngineError):
    """The request waited longer than `queue_timeout_s` without being scheduled."""


class EngineStopped(EngineError):
    """The engine is not running (not started, stopping, or failed)."""


class RequestFailed(EngineError):
    """Processing this request raised; other requests were not affected. `__cause__` holds the error."""

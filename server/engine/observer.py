"""`EngineObserver`: the engine's metrics callbacks, torch-free so that `server.metrics` (and through it
the API layer) can implement them without importing the engine's torch code."""

from __future__ import annotations


class EngineObserver:
    """Callbacks for metrics; subclass and override what you need (all are no-ops here).

    Called on the event loop thread; keep them cheap. The engine never imports a metrics library.
    """

    def on_step(self, batch_size: int, num_distinct_tasks: int, kv_usage_ratio: float) -> None: ...
    def on_queue_time(self, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_token(self, inter_token_seconds: float) -> None: ...
    # Once per engine step: prompt tokens computed in it (prefill chunks) and tokens generated in it.
    def on_iteration(self, prompt_tokens: int, generation_tokens: int) -> None: ...
    def on_finish(
        self,
        reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        e2e_seconds: float,
        tenant: str,
        task: str | None,
    ) -> None: ...
    def on_prefix_load(self, seconds: float) -> None: ...
    def on_cache_event(self, kind: str, tier: str) -> None: ...
    # A prefix blob read from the store: reason "request" (a request's miss) or "warm" (warm start).
    def on_store_read(self, reason: str, nbytes: int) -> None: ...

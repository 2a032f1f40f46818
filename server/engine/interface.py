"""What the rest of the server sees of the engine: `ServingEngine`, the front end's public surface.

Torch-free, so the API layer, the metrics and the load test type against the engine without loading
torch: `server.engine.frontend.EngineFrontEnd` (our engine, `Engine`, and vLLM's, `VllmEngine`) is the
one implementation; mypy checks that it satisfies this protocol (`frontend.py`, end of file).
"""

from __future__ import annotations

from typing import Any, Protocol

from server.engine.handle import RequestHandle
from server.engine.types import GenerationRequest


class Tokenizer(Protocol):
    """The model's tokenizer as the API uses it (a transformers tokenizer: `PreTrainedTokenizerBase`)."""

    @property
    def special_tokens_map(self) -> dict[str, Any]: ...

    def encode(self, text: str, text_pair: None = None, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str | list[str]: ...

    def __call__(
        self,
        text: str | list[str],
        text_pair: None = None,
        text_target: None = None,
        text_pair_target: None = None,
        add_special_tokens: bool = True,
    ) -> Any: ...


class ServingEngine(Protocol):
    """See the module docstring and `EngineFrontEnd` for each member's meaning."""

    backend: str  # "native" | "vllm"
    healthy: bool

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def running_tasks(self) -> list[str]: ...

    @property
    def waiting_tasks(self) -> list[str]: ...

    @property
    def kv_usage_ratio(self) -> float: ...

    @property
    def resident_prefixes(self) -> list[tuple[str, str]]: ...

    @property
    def resident_prefix_capacity(self) -> int: ...

    def prefix_cache_bytes(self, tier: str) -> int: ...

    def queue_refusal(self, tenant: str) -> str | None: ...

    def tokenize(self, prompt: str | list[int]) -> list[int]: ...

    async def add_request(self, request: GenerationRequest) -> RequestHandle: ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout_s: float = 30.0) -> None: ...

    async def warm(self, tenant: str, task: str) -> bool: ...

"""`VllmEngine`: the engine front end over vLLM (`backend.VllmBackend`), as `server.engine.Engine` is
over our own model backend. The request path is the front end's (`server.engine.frontend`); vLLM's
part and how prefixes become virtual tokens are in `backend.py` and `model.py`."""

from __future__ import annotations

from typing import Any

import torch

from modeling.models import LoadedModel
from prefix_store.base import PrefixStore
from server.engine.errors import EngineError
from server.engine.frontend import EngineConfig, EngineFrontEnd
from server.engine.observer import EngineObserver
from server.vllm_backend.backend import VllmBackend
from server.vllm_backend.core import VllmCore, VllmOptions
from server.vllm_backend.rows import PrefixRows
from server.vllm_backend.support import unsupported_reason

__all__ = ["VllmEngine", "VllmOptions"]


class VllmEngine(EngineFrontEnd):
    """The front end over `VllmBackend`. A `core` given here is shared (tests): this engine leaves it
    running when it stops."""

    model: VllmBackend

    def __init__(
        self,
        loaded: LoadedModel,
        store: PrefixStore | None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        options: VllmOptions | None = None,
        core: VllmCore | None = None,
    ) -> None:
        reason = unsupported_reason(loaded)
        if reason is not None:
            raise EngineError(f"the vLLM backend cannot serve this model: {reason}")
        config = config or EngineConfig()
        backend = VllmBackend(loaded, config.limits, options, core)
        # The prefix cache keeps the host tier here; the device tier is vLLM's prefix table.
        super().__init__(
            loaded, store, backend, config, observer, prefix_device=torch.device("cpu"), prefix_device_bytes=0
        )

    @property
    def core(self) -> VllmCore | None:
        return self.model.core

    @property
    def llm(self) -> Any:
        return self.model.llm

    @llm.setter
    def llm(self, llm: Any) -> None:  # tests wrap vLLM's client to inject faults
        self.model.llm = llm

    @property
    def rows(self) -> PrefixRows:
        return self.model.rows

    @property
    def prefix_rows(self) -> int:
        return self.model.prefix_rows

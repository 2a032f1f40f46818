"""Shared fixtures: tiny GPT-2 models built in-process, random prefixes, and HF PEFT references.

The tiny model uses a large `initializer_range` so greedy outputs vary token to token (the default
init makes a random tiny GPT-2 repeat one token, which would make equivalence tests weak).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from modeling.model_spec import ModelSpec
from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import PrefixArtifact, dump_artifact, new_artifact
from prefix_store.base import ChangeCallback, StoredPrefix
from prefix_store.local_store import LocalPrefixStore
from prefix_store.peft_format import PEFT_TENSOR, artifact_to_peft
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, StreamEvent
from server.limits import Limits

TINY_OVERRIDES = {"initializer_range": 0.3}
PREFIX_LENGTHS = (1, 5, 10, 200)

# The scheduler has no defaults of its own (the engine fills it from `Limits`): the pure scheduler tests'.
SCHEDULER_LIMITS: dict[str, float] = {
    "max_running": 32,
    "max_prefill_tokens": 4096,
    "kv_budget_tokens": 32 * 1024,
    "max_waiting": 256,
    "queue_timeout_s": 60.0,
}


def random_artifact(spec: ModelSpec, length: int, seed: int, task: str = "") -> PrefixArtifact:
    """A prefix of realistic scale (randn * 0.5): large enough to change the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, spec.num_heads, length, spec.head_dim)
    return new_artifact({"decoder": torch.randn(shape, generator=g) * 0.5}, spec, task=task)


class PeftReference:
    """HF PEFT prefix-tuning models (one per artifact) and the plain HF model, run one request at a time."""

    def __init__(self, model_dir: Path, loaded: LoadedModel) -> None:
        self.model_dir = model_dir
        self.loaded = loaded
        self._peft: dict[int, Any] = {}

    def model_for(self, artifact: PrefixArtifact | None) -> Any:
        if artifact is None:
            return self.loaded.model
        key = id(artifact)
        if key not in self._peft:
            base = load_model(str(self.model_dir), "cpu").model
            length = artifact.prefix_length()
            peft_model = get_peft_model(
                base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
            )
            # PEFT's saved tensor is the prompt encoder's embedding weight (prefix_projection=False).
            _, weights = artifact_to_peft(artifact, self.loaded.spec)
            from safetensors.torch import load as st_load

            with torch.no_grad():
                peft_model.prompt_encoder["default"].embedding.weight.copy_(st_load(weights)[PEFT_TENSOR])
            peft_model.eval()
            self._peft[key] = (artifact, peft_model)  # keep the artifact alive so id() stays unique
        return self._peft[key][1]

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], artifact: PrefixArtifact | None, max_new_tokens: int
    ) -> list[int]:
        """Greedy tokens for this request alone, stopping at EOS like HF generate.

        Built on PEFT's *forward* (the whole sequence each step), not `PeftModel.generate`: with
        transformers 5.24 + peft 0.21.2, `generate` on a prefix-tuned GPT-2 silently drops the prefix
        (generate passes its own empty `cache`, which GPT-2's forward prefers over the deprecated
        `past_key_values` PEFT fills) while still shifting positions by L, so it computes neither
        model. PEFT's forward is correct (it matches the paper's computation to 1e-7).
        """
        model = self.model_for(artifact)
        eos = self.loaded.model.config.eos_token_id
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            ids = torch.tensor([prompt_ids + tokens])
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
        return tokens

    @torch.no_grad()
    def step_logits(
        self, prompt_ids: list[int], artifact: PrefixArtifact | None, tokens: list[int]
    ) -> torch.Tensor:
        """Next-token logits after the prompt and each generated token: [len(tokens) + 1, V]."""
        model = self.model_for(artifact)
        ids = torch.tensor([prompt_ids + tokens])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        return logits[len(prompt_ids) - 1 :].float()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("tiny-gpt2", tmp_path_factory.mktemp("tiny-gpt2"), **TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def artifacts(tiny: LoadedModel) -> dict[int, PrefixArtifact]:
    """One task per prefix length, keyed by length."""
    return {n: random_artifact(tiny.spec, n, seed=100 + n, task=f"task-{n}") for n in PREFIX_LENGTHS}


@pytest.fixture(scope="session")
def peft_ref(tiny_dir: Path, tiny: LoadedModel) -> PeftReference:
    return PeftReference(tiny_dir, tiny)


class CountingStore:
    """A real store with its `get` calls counted (and optionally made slow, held, or to fail as if the
    backend were down)."""

    def __init__(self, inner: LocalPrefixStore) -> None:
        self.inner = inner
        self.get_calls = 0
        self.fail_with: Exception | None = None
        self.get_delay_s = 0.0
        self.gate: asyncio.Event | None = None  # when set: every `get` waits until the event is set

    async def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrefix:
        self.get_calls += 1
        if self.get_delay_s:
            await asyncio.sleep(self.get_delay_s)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return await self.inner.get(tenant, task, version)

    def subscribe(self, callback: ChangeCallback) -> None:
        self.inner.subscribe(callback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def store(tmp_path: Path, artifacts: dict[int, PrefixArtifact]) -> AsyncIterator[CountingStore]:
    """A LocalPrefixStore holding tasks "task-1", "task-5", "task-10", "task-200" for tenant "default"."""
    inner = LocalPrefixStore(tmp_path / "store")
    await inner.start()
    for length, artifact in artifacts.items():
        await inner.put("default", f"task-{length}", dump_artifact(artifact), {})
    yield CountingStore(inner)
    await inner.close()


@pytest.fixture
def make_engine(tiny: LoadedModel) -> Callable[..., Any]:
    """Factory: `async with make_engine(store, **config) as engine:` starts and stops an engine."""
    import contextlib

    @contextlib.asynccontextmanager
    async def factory(store: Any = None, observer: Any = None, **config: Any) -> AsyncIterator[Engine]:
        engine = Engine(tiny, store, EngineConfig(Limits(**config)), observer=observer)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop(drain_timeout_s=0)

    return factory


async def collect(engine: Engine, request: GenerationRequest) -> list[StreamEvent]:
    """All events of one request."""
    return [event async for event in engine.generate(request)]


def greedy(max_new_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)

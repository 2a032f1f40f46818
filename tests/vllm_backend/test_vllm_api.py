"""The HTTP API over the vLLM backend: one app on the shared vLLM engine, real store, real model.

What a user sees must not depend on the backend: uploads then generation with the task's prefix
(output equal to HF PEFT's), usage and prompt logprobs net of the prefix's virtual positions, TGI and
OpenAI routes, n / seeds / logit_bias / stop, clear errors (unknown task 404, typical_p and too-long
prompts 422), typical_p through our logits processor, and the metrics fed by the same observer hooks as the native engine's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch

from modeling.models import LoadedModel
from prefix_store.artifact import load_artifact
from prefix_store.local_store import LocalPrefixStore
from prefix_store.uploads import ArtifactUploadChecks
from server.api import create_app
from server.metrics import Metrics
from server.settings import Settings
from server.vllm_backend.engine import VllmEngine
from tests.api.conftest import ACME, GLOBEX, artifact_bytes
from tests.engine.conftest import PeftReference

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Shared:
    """The engine as the app sees it: the app's lifespan stops its engine, but this one is shared by
    the package's tests and stopped by its own fixture."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        pass


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def client(
    vllm_engine: VllmEngine, vllm_store: LocalPrefixStore, vllm_settings: Settings, vllm_metrics: Metrics,
    h32: LoadedModel,
) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    app = create_app(
        vllm_settings, engine=_Shared(vllm_engine), store=vllm_store, spec=h32.spec,
        uploads=ArtifactUploadChecks(), metrics=vllm_metrics,
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120
        )
        yield await stack.enter_async_context(client)


async def upload(client: httpx.AsyncClient, task: str, data: bytes) -> httpx.Response:
    files = {"artifact": ("prefix.safetensors", data, "application/octet-stream")}
    return await client.post("/v1/prefixes", data={"task": task}, files=files, headers=ACME)


async def generate(
    client: httpx.AsyncClient, inputs: str, task: str | None = None, **params: Any
) -> httpx.Response:
    body = {"task": task, "inputs": inputs, "parameters": {"max_new_tokens": 8, "details": True, **params}}
    return await client.post("/v1/generate", json=body, headers=ACME)


async def test_uploaded_task_generates_what_peft_generates_and_counts_only_the_prompt(
    client: httpx.AsyncClient, h32: LoadedModel, h32_peft: PeftReference
) -> None:
    data = artifact_bytes(h32.spec, seed=3, length=12)
    assert (await upload(client, "poems", data)).status_code == 201
    prompt = "The quick brown fox jumps"
    r = await generate(client, prompt, task="poems", max_new_tokens=8, decoder_input_details=True)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    ids = h32.tokenizer.encode(prompt)
    artifact = load_artifact(data, h32.spec)
    want = h32_peft.generate(ids, artifact, 8)
    assert [t["id"] for t in details["tokens"]] == want
    assert details["prefix_version"] == 1 and details["generated_tokens"] == len(want)
    # Prompt logprobs: the prompt's own tokens only (no virtual positions), each given prefix + before.
    prefill = details["prefill"]
    assert [p["id"] for p in prefill] == ids and prefill[0]["logprob"] is None
    with torch.no_grad():
        model = h32_peft.model_for(artifact)
        ids_t = torch.tensor([ids])
        logp = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits[0].float().log_softmax(-1)
    for i in range(1, len(ids)):
        assert abs(prefill[i]["logprob"] - float(logp[i - 1, ids[i]])) < 1e-3
    # Another tenant does not see the task.
    other = await client.post("/v1/generate", json={"task": "poems", "inputs": "x"}, headers=GLOBEX)
    assert other.status_code == 404


async def test_openai_completion_usage_echo_and_logprobs_are_net_of_the_prefix(
    client: httpx.AsyncClient, h32: LoadedModel
) -> None:
    assert (await upload(client, "echoes", artifact_bytes(h32.spec, seed=5, length=20))).status_code == 201
    prompt = "Once upon a time"
    body = {
        "model": "echoes",
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
    }
    r = await client.post("/v1/completions", json=body, headers=ACME)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = h32.tokenizer.encode(prompt)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 4
    choice = out["choices"][0]
    assert choice["text"].startswith(prompt)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 4  # echoed prompt + generated, no virtual tokens
    # At most the 2 asked for, plus the chosen token where it is not among them (as OpenAI documents).
    assert all(len(top) <= 3 for top in logprobs["top_logprobs"] if top)


async def test_sampling_parameters_map_to_vllm(client: httpx.AsyncClient) -> None:
    base = {"model": "tiny-gpt2-h32", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    plain = (await client.post("/v1/completions", json=base, headers=ACME)).json()["choices"][0]["text"]
    forced = await client.post("/v1/completions", json=base | {"logit_bias": {"11": 100}}, headers=ACME)
    assert forced.json()["choices"][0]["text"] == "," * 6  # token 11 is ","
    assert plain != forced.json()["choices"][0]["text"]
    stopped = await client.post(
        "/v1/completions", json=base | {"logit_bias": {"11": 100}, "stop": [",,,"]}, headers=ACME
    )
    assert (
        stopped.json()["choices"][0]["text"] == "" and stopped.json()["choices"][0]["finish_reason"] == "stop"
    )
    seeded = base | {"temperature": 1.5, "seed": 1234, "n": 2}
    a = (await client.post("/v1/completions", json=seeded, headers=ACME)).json()["choices"]
    b = (await client.post("/v1/completions", json=seeded, headers=ACME)).json()["choices"]
    assert [c["text"] for c in a] == [c["text"] for c in b]  # seeded: reproducible
    assert a[0]["text"] != a[1]["text"]  # n: each sequence its own seed


async def test_typical_p_filters_inside_vllm(client: httpx.AsyncClient) -> None:
    """typical_p that keeps only the most typical token makes sampling deterministic whatever the seed;
    without it the same seeds sample different texts."""
    texts = {}
    for typical_p in (1.0, 1e-9):
        for seed in (1, 2, 3):
            r = await generate(
                client, "Once upon", do_sample=True, temperature=2.0, seed=seed, typical_p=typical_p
            )
            assert r.status_code == 200, r.text
            texts[typical_p, seed] = r.json()["generated_text"]
    assert len({texts[1e-9, s] for s in (1, 2, 3)}) == 1
    assert len({texts[1.0, s] for s in (1, 2, 3)}) == 3


async def test_clear_errors(client: httpx.AsyncClient, h32: LoadedModel) -> None:
    unknown = await generate(client, "Hi", task="no-such-task")
    assert unknown.status_code == 404
    assert (await upload(client, "long", artifact_bytes(h32.spec, seed=6, length=200))).status_code == 201
    prompt = " ".join(["word"] * 300)  # 300 tokens: fits the model alone, not with 200 prefix positions
    too_long = await generate(client, prompt, task="long", max_new_tokens=20)
    assert too_long.status_code == 422, too_long.text
    assert "prefix length 200" in too_long.text and "512" in too_long.text
    fits = await generate(client, prompt, max_new_tokens=20)
    assert fits.status_code == 200


async def test_metrics_come_from_the_same_observer_hooks(client: httpx.AsyncClient) -> None:
    assert (await generate(client, "Count me", max_new_tokens=3)).status_code == 200
    text = (await client.get("/metrics")).text

    def value(name: str) -> float:
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert match, name
        return float(match.group(1))

    assert value("prefixserve_generation_tokens_total") >= 3
    assert value("prefixserve_batch_size_count") >= 1  # vLLM's steps, through its stat logger
    assert value("prefixserve_time_to_first_token_seconds_count") >= 1

"""Structured output on BART (our engine: vLLM has no BART) with its three prefixes (encoder, decoder,
cross-attention), through the real clients and a real uvicorn server, two tasks sharing the batch.
Random weights: only the constraint makes an answer valid. (BART is served by the native engine in
both passes of the suite.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import dump_artifact, new_artifact
from server.engine import EngineConfig
from server.limits import Limits
from tests.api.conftest import ACME, Api, serve_http
from tests.api.structured_cases import (
    CHOICES,
    CODE_REGEX,
    DATE_REGEX,
    TICKET_SCHEMA,
    Review,
    check_choice,
    check_json,
    check_regex,
    review_schema,
)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    model_dir = make_model_dir("tiny-bart", tmp_path_factory.mktemp("tiny-bart"), seed=0)
    return load_model(str(model_dir), "cpu", "float32"), model_dir


def three_prefixes(model: LoadedModel, seed: int) -> bytes:
    """The paper's BART placement: encoder, decoder and cross-attention prefixes (lengths 3, 4, 5)."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = {}
    for kind, length in (("encoder", 3), ("decoder", 4), ("cross", 5)):
        layers, heads, head_dim = model.spec.layout(kind)
        prefixes[kind] = torch.randn(layers, 2, heads, length, head_dim, generator=gen) * 2
    return dump_artifact(new_artifact(prefixes, model.spec, task=f"t{seed}"))


@pytest.fixture
async def served_bart(make_api, bart, tmp_path) -> AsyncIterator[tuple[Api, str]]:
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    limits = Limits(max_batch_size=8, max_waiting=16, queue_timeout_s=120)
    api = await make_api(
        start=False,
        serve_model=bart,
        chat_template=template,
        queue_timeout_s=120,
        engine_config=EngineConfig(limits),
        served_model_name="tiny-bart",
    )
    async with serve_http(api) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for task, seed in (("summaries", 31), ("labels", 32)):
                files = {
                    "artifact": ("p.safetensors", three_prefixes(bart[0], seed), "application/octet-stream")
                }
                r = await client.post("/v1/prefixes", data={"task": task}, files=files, headers=ACME)
                assert r.status_code == 201, r.text
        yield api, url


async def test_real_clients_get_valid_answers_from_bart_with_three_prefixes(served_bart):
    import openai
    from lorax import Client as LoraxClient
    from text_generation import Client as TgiClient
    from text_generation.types import Grammar, GrammarType

    api, url = served_bart
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="acme-manage-key", max_retries=0, timeout=120)
    headers = {"Authorization": "Bearer acme-manage-key"}
    tgi = TgiClient(url, headers=headers, timeout=120)
    lorax = LoraxClient(url, headers=headers, timeout=120)

    def completions(task: str, structured: dict, max_tokens: int):
        return client.completions.create(
            model=task, prompt="A long article about trains.", max_tokens=max_tokens, temperature=0,
            extra_body={"structured_outputs": structured},
        )  # fmt: skip

    def run() -> dict:
        with ThreadPoolExecutor(4) as pool:  # both tasks side by side in the batch
            dates = pool.submit(completions, "summaries", {"regex": DATE_REGEX}, 30)
            choice = pool.submit(completions, "labels", {"choice": CHOICES}, 10)
            lorax_json = pool.submit(
                lorax.generate, "A ticket.", adapter_id="labels", max_new_tokens=120,
                response_format={"type": "json_object", "schema": TICKET_SCHEMA},
            )  # fmt: skip
            parsed = pool.submit(
                client.chat.completions.parse, model="summaries", messages=[{"role": "user", "content": "Rate it"}],
                response_format=Review, max_tokens=150, temperature=0,
            )  # fmt: skip
            return {
                "dates": dates.result(),
                "choice": choice.result(),
                "lorax_json": lorax_json.result(),
                "parsed": parsed.result(),
                "tgi_regex": tgi.generate(
                    "Code:", max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=CODE_REGEX)
                ),
            }

    out = await asyncio.to_thread(run)
    check_regex(out["dates"].choices[0].text, DATE_REGEX)
    check_choice(out["choice"].choices[0].text, CHOICES)
    check_json(out["lorax_json"].generated_text, TICKET_SCHEMA)
    message = out["parsed"].choices[0].message
    assert isinstance(message.parsed, Review), message.content
    check_json(message.content, review_schema())
    check_regex(out["tgi_regex"].generated_text, CODE_REGEX)
    # Without the constraint the same BART task writes no date.
    free = await asyncio.to_thread(
        client.completions.create,
        model="summaries",
        prompt="A long article about trains.",
        max_tokens=12,
        temperature=0,
    )
    assert free.choices[0].text != out["dates"].choices[0].text
    assert (
        api.metrics.registry.get_sample_value("prefixserve_structured_requests_total", {"kind": "regex"}) or 0
    ) >= 2

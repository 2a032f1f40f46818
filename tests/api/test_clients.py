"""The real clients users have (`openai`, HF `text-generation`) against a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn

from tests.api.conftest import Api, artifact_bytes


@pytest.fixture
async def served(make_api, loaded) -> AsyncIterator[tuple[Api, str]]:
    """An app with one task, served by uvicorn on a free loopback port (lifespan run by uvicorn)."""
    api = await make_api(start=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api.app, log_config=None, access_log=False, lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + 30
    while not server.started:
        assert not serving.done(), "uvicorn exited during start-up"
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        files = {"artifact": ("p.safetensors", artifact_bytes(loaded.spec, 7), "application/octet-stream")}
        r = await client.post(
            "/v1/prefixes",
            data={"task": "poems"},
            files=files,
            headers={"Authorization": "Bearer acme-manage-key"},
        )
        assert r.status_code == 201, r.text
    try:
        yield api, url
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=30)
        sock.close()


async def test_openai_client_completions_and_stream(served):
    import openai

    api, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="acme-manage-key", max_retries=0)

    def run() -> dict:
        models = [m.id for m in client.models.list()]
        done = client.completions.create(model="poems", prompt="Roses are red", max_tokens=6, temperature=0)
        chunks = list(
            client.completions.create(
                model="poems", prompt="Roses are red", max_tokens=6, temperature=0, stream=True
            )
        )
        base = client.completions.create(
            model=api.app.state.prefixserve.config.model_id, prompt="Hi", max_tokens=3
        )
        try:
            client.completions.create(model="no-such-task", prompt="x", max_tokens=2)
            not_found = None
        except openai.NotFoundError as exc:
            not_found = exc
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0).models.list()
            unauthorized = None
        except openai.AuthenticationError as exc:
            unauthorized = exc
        return {
            "models": models,
            "done": done,
            "chunks": chunks,
            "base": base,
            "nf": not_found,
            "ua": unauthorized,
        }

    out = await asyncio.to_thread(run)
    assert out["models"][1:] == ["poems"]
    done = out["done"]
    assert done.object == "text_completion" and done.model == "poems"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 6 and done.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in out["chunks"])
    assert streamed == done.choices[0].text
    assert out["chunks"][-1].choices[0].finish_reason == "length"
    assert out["base"].usage.completion_tokens == 3
    assert out["nf"] is not None and "no-such-task" in str(out["nf"])
    assert out["ua"] is not None


async def test_text_generation_client(served):
    from text_generation import Client
    from text_generation.errors import ValidationError

    _, url = served
    client = Client(url, headers={"Authorization": "Bearer acme-manage-key"}, timeout=60)

    def run() -> dict:
        response = client.generate("Hello there", max_new_tokens=5)
        tokens = list(client.generate_stream("Hello there", max_new_tokens=5))
        try:
            client.generate("Hello", max_new_tokens=5000)
            error = None
        except ValidationError as exc:
            error = exc
        return {"response": response, "tokens": tokens, "error": error}

    out = await asyncio.to_thread(run)
    response = out["response"]
    assert response.details.generated_tokens == 5
    assert response.details.finish_reason == "length"
    assert len(response.details.tokens) == 5
    tokens = out["tokens"]
    assert len(tokens) == 5
    assert tokens[-1].generated_text == response.generated_text
    assert [t.token.id for t in tokens] == [t.id for t in response.details.tokens]
    assert out["error"] is not None and "5000" in str(out["error"])

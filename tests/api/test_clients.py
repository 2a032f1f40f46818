"""The real clients users have (`openai`, HF `text-generation`, LoRAX's `lorax-client`) against a real
uvicorn server, used as their users do: unchanged, with the values they send by default."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.api.conftest import Api, artifact_bytes, serve_http

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
async def served(make_api, loaded, tmp_path) -> AsyncIterator[tuple[Api, str]]:
    """An app with one task, served by uvicorn on a free loopback port (lifespan run by uvicorn)."""
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    api = await make_api(start=False, chat_template=template)
    async with serve_http(api) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            files = {
                "artifact": ("p.safetensors", artifact_bytes(loaded.spec, 7), "application/octet-stream")
            }
            r = await client.post(
                "/v1/prefixes",
                data={"task": "poems"},
                files=files,
                headers={"Authorization": "Bearer acme-manage-key"},
            )
            assert r.status_code == 201, r.text
        yield api, url


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


async def _native(url: str, inputs: str, max_new_tokens: int, task: str | None = "poems", **params) -> dict:
    """What `/v1/generate` answers (greedy unless `params` say otherwise): the clients' reference."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.post(
            "/v1/generate",
            json={
                "task": task,
                "inputs": inputs,
                "parameters": {"max_new_tokens": max_new_tokens, "details": True, **params},
            },
            headers={"Authorization": "Bearer acme-manage-key"},
        )
    assert r.status_code == 200, r.text
    return r.json()


async def test_openai_client_with_wrapper_defaults_n_logprobs_usage_and_chat(served):
    import openai

    api, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="acme-manage-key", max_retries=0)
    # What LangChain-style wrappers send on every call.
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "n": 1, "top_p": 1, "logit_bias": {}}

    def run() -> dict:
        plain = client.completions.create(
            model="poems", prompt="Roses are red", max_tokens=6, temperature=0, **neutral
        )
        chunks = list(
            client.completions.create(
                model="poems",
                prompt="Roses are red",
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                **neutral,
            )
        )
        two = client.completions.create(model="poems", prompt="Roses are red", max_tokens=6, n=2, seed=3)
        logprobs = client.completions.create(
            model="poems", prompt="Roses are red", max_tokens=4, temperature=0, logprobs=3, echo=True
        )
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Roses are red"}]
        chat = client.chat.completions.create(
            model="poems", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
        )
        chat_chunks = list(
            client.chat.completions.create(
                model="poems",
                messages=messages,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return {
            "plain": plain,
            "chunks": chunks,
            "two": two,
            "logprobs": logprobs,
            "chat": chat,
            "chat_chunks": chat_chunks,
        }

    out = await asyncio.to_thread(run)
    reference = await _native(url, "Roses are red", 6)
    plain = out["plain"]
    assert plain.choices[0].text == reference["generated_text"]
    # Streamed: the same text, then a last chunk with no choices and the usage.
    chunks = out["chunks"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["generated_text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    # n=2: two sequences, sampled with seeds 3 and 4: each is what /v1/generate samples with that seed.
    two = out["two"]
    assert [c.index for c in two.choices] == [0, 1]
    sampled = [await _native(url, "Roses are red", 6, do_sample=True, seed=seed) for seed in (3, 4)]
    assert [c.text for c in two.choices] == [r["generated_text"] for r in sampled]
    assert two.usage.completion_tokens == sum(r["details"]["generated_tokens"] for r in sampled)
    # logprobs=3 + echo: prompt tokens first (the first has no logprob), then 4 generated with 3 alternatives.
    lp = out["logprobs"].choices[0]
    assert lp.text.startswith("Roses are red")
    num_prompt = out["logprobs"].usage.prompt_tokens
    assert len(lp.logprobs.tokens) == num_prompt + 4
    assert lp.logprobs.token_logprobs[0] is None and all(x <= 0 for x in lp.logprobs.token_logprobs[1:])
    assert all(len(top) == 3 for top in lp.logprobs.top_logprobs[num_prompt:])
    # Greedy: each generated token is its step's most likely one.
    for logprob, top in zip(
        lp.logprobs.token_logprobs[num_prompt:], lp.logprobs.top_logprobs[num_prompt:], strict=True
    ):
        assert abs(max(top.values()) - logprob) < 1e-5
    # Chat: the template's rendering, then the completion of it.
    rendered = "system: Be brief.\nuser: Roses are red\nassistant:"
    chat_reference = await _native(url, rendered, 5)
    chat = out["chat"]
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_reference["generated_text"]
    assert len(chat.choices[0].logprobs.content) == 5
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in out["chat_chunks"] if c.choices)
    assert streamed == chat_reference["generated_text"]
    assert out["chat_chunks"][-1].usage.completion_tokens == 5


async def test_openai_client_sees_why_a_field_is_refused(served):
    import openai

    _, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="acme-manage-key", max_retries=0)

    def run() -> list:
        errors = []
        for kwargs in ({"suffix": "end"}, {"presence_penalty": 3}):
            try:
                client.completions.create(model="poems", prompt="x", max_tokens=2, **kwargs)
            except openai.UnprocessableEntityError as exc:
                errors.append(str(exc))
        try:
            client.chat.completions.create(
                model="poems",
                messages=[{"role": "user", "content": "x"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            )
        except openai.UnprocessableEntityError as exc:
            errors.append(str(exc))
        return errors

    errors = await asyncio.to_thread(run)
    assert len(errors) == 3
    assert "suffix" in errors[0] and "not supported" in errors[0]
    assert "presence_penalty" in errors[1]
    assert "tool calling is not supported" in errors[2]


async def test_lorax_client_generate_and_stream_equal_generate(served):
    from lorax import Client
    from lorax.errors import ValidationError

    _, url = served
    client = Client(url, headers={"Authorization": "Bearer acme-manage-key"}, timeout=60)

    def run() -> dict:
        response = client.generate("Hello there", adapter_id="poems", max_new_tokens=6)
        tokens = list(client.generate_stream("Hello there", adapter_id="poems", max_new_tokens=6))
        rich = client.generate(
            "Hello there",
            adapter_id="poems",
            max_new_tokens=3,
            return_k_alternatives=2,
            decoder_input_details=True,
        )
        try:
            client.generate("Hello", adapter_id="poems", adapter_source="hub", max_new_tokens=2)
            refused = None
        except ValidationError as exc:
            refused = exc
        return {"response": response, "tokens": tokens, "rich": rich, "refused": refused}

    out = await asyncio.to_thread(run)
    reference = await _native(url, "Hello there", 6)
    response = out["response"]
    assert response.generated_text == reference["generated_text"]
    assert [t.id for t in response.details.tokens] == [t["id"] for t in reference["details"]["tokens"]]
    assert response.details.prompt_tokens > 0
    tokens = out["tokens"]
    assert "".join(t.token.text for t in tokens) == reference["generated_text"]
    assert tokens[-1].generated_text == reference["generated_text"]
    rich = out["rich"].details
    assert all(len(t.alternative_tokens) == 2 for t in rich.tokens)
    assert all(t.id == t.alternative_tokens[0].id for t in rich.tokens)  # greedy: the best alternative
    assert len(rich.prefill) == rich.prompt_tokens and rich.prefill[0].logprob is None
    assert all(p.logprob is not None and p.logprob <= 0 for p in rich.prefill[1:])
    assert out["refused"] is not None and "hub" in str(out["refused"])


async def test_text_generation_client_rich_parameters(served):
    from text_generation import Client

    _, url = served
    client = Client(url, headers={"Authorization": "Bearer acme-manage-key"}, timeout=60)

    def run() -> dict:
        rich = client.generate(
            "Hello there",
            max_new_tokens=4,
            top_n_tokens=3,
            decoder_input_details=True,
            truncate=1,
        )
        best_of = client.generate(
            "Hello there", max_new_tokens=4, best_of=3, do_sample=True, typical_p=0.9, frequency_penalty=0.5
        )
        stream = list(client.generate_stream("Hello there", max_new_tokens=3, top_n_tokens=2))
        return {"rich": rich, "best_of": best_of, "stream": stream}

    out = await asyncio.to_thread(run)
    rich = out["rich"].details
    assert len(rich.prefill) == 1  # truncate=1 keeps the last prompt token
    assert [len(top) for top in rich.top_tokens] == [3, 3, 3, 3]
    assert [t.id for t in rich.tokens] == [top[0].id for top in rich.top_tokens]  # greedy
    best = out["best_of"].details
    assert len(best.best_of_sequences) == 2
    best_score = sum(t.logprob for t in best.tokens)
    assert all(best_score >= sum(t.logprob for t in s.tokens) for s in best.best_of_sequences)
    assert all(len(event.top_tokens) == 2 for event in out["stream"])

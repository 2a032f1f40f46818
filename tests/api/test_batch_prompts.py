"""Several prompts in one completions request, `max_tokens: 0` with `echo`, the echoed prompt's
alternatives and the SSE framing, as the `openai` client and LangChain (a framework that packs up to 20
prompts into one call) use them against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.api.conftest import ACME
from tests.api.test_clients import _native, served  # noqa: F401  (`served`: the fixture, shared)

KEY = "acme-manage-key"


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


async def test_openai_client_prompt_list_of_strings_and_of_token_ids(served):  # noqa: F811
    api, url = served
    client = _client(url)
    prompts = ["Roses are red", "Hello there", "The answer is"]
    tokenizer = api.engine.tokenizer
    ids = [tokenizer.encode(p) for p in prompts]

    def run() -> dict:
        extra = {"extra_body": {"ignore_eos": True}}
        return {
            "text": client.completions.create(model="poems", prompt=prompts, max_tokens=5, temperature=0, **extra),
            "ids": client.completions.create(model="poems", prompt=ids, max_tokens=5, temperature=0, **extra),
            "n2": client.completions.create(model="poems", prompt=prompts[:2], max_tokens=4, n=2, seed=7, **extra),
            "stream": list(
                client.completions.create(
                    model="poems", prompt=prompts[:2], max_tokens=4, n=2, seed=7, stream=True,
                    stream_options={"include_usage": True}, **extra,
                )
            ),
        }  # fmt: skip

    out = await asyncio.to_thread(run)
    references = [await _native(url, p, 5, ignore_eos=True) for p in prompts]
    prompt_tokens = sum(len(i) for i in ids)
    for name in ("text", "ids"):  # one choice per prompt, in order, each the prompt's own completion
        response = out[name]
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert [c.text for c in response.choices] == [r["generated_text"] for r in references]
        assert response.usage.prompt_tokens == prompt_tokens  # each prompt counted once
        assert response.usage.completion_tokens == 3 * 5
    # n=2 per prompt: index = prompt index x n + i; sequence i of every prompt is seeded seed + i.
    n2 = out["n2"]
    assert [c.index for c in n2.choices] == [0, 1, 2, 3]
    sampled = [
        await _native(url, p, 4, do_sample=True, seed=seed, ignore_eos=True)
        for p in prompts[:2]
        for seed in (7, 8)
    ]
    assert [c.text for c in n2.choices] == [r["generated_text"] for r in sampled]
    assert n2.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert n2.usage.completion_tokens == 4 * 4
    # Streamed: the same four choices, interleaved, then one usage chunk for the whole request.
    texts: dict[int, str] = {}
    for chunk in out["stream"]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in n2.choices}
    assert out["stream"][-1].choices == []
    assert out["stream"][-1].usage.model_dump() == n2.usage.model_dump()


async def test_langchain_batch_packs_prompts_into_one_request(served):  # noqa: F811
    from langchain_openai import OpenAI

    api, url = served
    prompts = ["Roses are red", "Hello there", "The answer is", "Once upon", "Two plus two"]
    llm = OpenAI(model="poems", base_url=f"{url}/v1", api_key=KEY, max_tokens=5, temperature=0, max_retries=0)

    def completions_requests() -> float:
        samples = api.metrics.registry.get_sample_value(
            "prefixserve_requests_total", {"endpoint": "/v1/completions", "status": "200"}
        )
        return samples or 0.0

    before = completions_requests()
    outputs = await asyncio.to_thread(llm.batch, prompts)
    assert completions_requests() - before == 1  # all five prompts in one call
    references = [await _native(url, p, 5) for p in prompts]
    assert outputs == [r["generated_text"] for r in references]


async def test_echo_alternatives_match_greedy_requests_and_max_tokens_zero(served):  # noqa: F811
    api, url = served
    client = _client(url)
    ids = api.engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    top_n = 5

    def run(model: str) -> dict:
        scored = client.completions.create(
            model=model, prompt=ids, max_tokens=0, echo=True, logprobs=top_n, temperature=0
        )
        # A greedy request from each prefix of the text, all in one request (a list of token-id lists).
        greedy = client.completions.create(
            model=model, prompt=[ids[:i] for i in range(1, len(ids))], max_tokens=1, temperature=0, logprobs=1
        )
        streamed = list(
            client.completions.create(
                model=model, prompt=ids, max_tokens=0, echo=True, logprobs=top_n, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        # Echo with generated tokens, whole and streamed: the same logprobs and text offsets.
        args = {"model": model, "prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}
        whole = client.completions.create(**args)
        pieces = list(client.completions.create(**args, stream=True))
        return {"scored": scored, "greedy": greedy, "streamed": streamed, "whole": whole, "pieces": pieces}

    for model in ("poems", api.app.state.prefixserve.config.model_id):
        out = await asyncio.to_thread(run, model)
        choice = out["scored"].choices[0]
        text = api.engine.tokenizer.decode(ids)
        # max_tokens 0: the prompt echoed, scored, nothing generated.
        assert choice.text == text and choice.finish_reason == "length"
        assert out["scored"].usage.completion_tokens == 0
        assert out["scored"].usage.prompt_tokens == len(ids)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            top = lp.top_logprobs[i]
            # N alternatives, plus the prompt's own token when it is not among them.
            assert len(top) == top_n + (lp.tokens[i] not in list(top)[:top_n])
            assert top[lp.tokens[i]] == lp.token_logprobs[i]
            greedy = out["greedy"].choices[i - 1]
            assert greedy.index == i - 1
            # The best alternative is what a greedy request from the same text returns, and its logprob.
            assert greedy.logprobs.tokens[0] in top
            assert max(top.values()) == pytest.approx(greedy.logprobs.token_logprobs[0], abs=1e-4)
        # Streamed: the echo chunk carries the same logprobs; the last chunk ends it, nothing generated.
        chunks = out["streamed"]
        assert chunks[0].choices[0].text == text
        assert chunks[0].choices[0].logprobs.top_logprobs == lp.top_logprobs
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == len(ids)
        whole = out["whole"].choices[0].logprobs
        streamed_lp = [c.choices[0].logprobs for c in out["pieces"] if c.choices and c.choices[0].logprobs]
        assert [t for lp in streamed_lp for t in lp.tokens] == whole.tokens
        assert [o for lp in streamed_lp for o in lp.text_offset] == whole.text_offset
        assert len(whole.tokens) == len(ids) + 3 and whole.text_offset[len(ids)] == len(text)


async def test_sse_framing_openai_with_a_space_tgi_without(served):  # noqa: F811
    _, url = served
    body = {"model": "poems", "prompt": ["Hello", "Hi"], "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=ACME) as client:
        openai_text = (await client.post("/v1/completions", json=body)).text
        chat = {
            "model": "poems",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "stream": True,
        }
        chat_text = (await client.post("/v1/chat/completions", json=chat)).text
        tgi = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        tgi_text = (await client.post("/generate_stream", json=tgi)).text
    for text in (openai_text, chat_text):  # OpenAI's and vLLM's framing: `data: {json}`, `data: [DONE]`
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), text
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert len(payloads) >= 3
    # TGI's framing (axum's): `data:{json}`, no [DONE].
    events = [e for e in tgi_text.split("\n\n") if e]
    assert len(events) == 3 and all(e.startswith("data:{") for e in events), tgi_text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ["a", "b", "c"]}, "3 prompts"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
        ({"prompt": [[1, 2], []]}, "prompt[1]"),
        ({"prompt": [[1, -2]]}, ">= 0"),
        ({"prompt": "a", "max_tokens": 0}, "echo"),
    ],
)
async def test_bad_prompt_lists_are_refused(make_api, body, message):
    api = await make_api(max_prompts_per_request=2)
    r = await api.client.post(
        "/v1/completions", json={"model": "tiny-gpt2", "max_tokens": 2, **body}, headers=ACME
    )
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
    assert api.engine.num_running == 0 and api.engine.num_waiting == 0

"""Structured output through the real clients (`openai`, HF `text-generation`, `lorax-client`) against a
real uvicorn server, GPT-2 with prefixes of several tasks sharing the batch (on vLLM too in the vLLM
pass). The model has random weights: only the constraint can make an answer parse, validate against its
schema (jsonschema), fully match its regex or be one of the choices."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.engine import EngineConfig
from server.limits import Limits
from tests.api.conftest import ACME, Api, artifact_bytes, serve_http
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

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TASKS = {"reviews": 11, "dates": 12, "answers": 13, "notes": 14}  # task -> artifact seed


@pytest.fixture
async def served(make_api, loaded, tmp_path) -> AsyncIterator[tuple[Api, str]]:
    """An app with four tasks and a chat template, served by uvicorn on a loopback port."""
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    # Generous waits: the first compile and render start worker processes (seconds on a loaded machine).
    limits = Limits(max_batch_size=8, max_waiting=16, queue_timeout_s=120)
    api = await make_api(
        start=False, chat_template=template, queue_timeout_s=120, engine_config=EngineConfig(limits)
    )
    async with serve_http(api) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for task, seed in TASKS.items():
                files = {
                    "artifact": (
                        "p.safetensors",
                        artifact_bytes(loaded.spec, seed),
                        "application/octet-stream",
                    )
                }
                r = await client.post("/v1/prefixes", data={"task": task}, files=files, headers=ACME)
                assert r.status_code == 201, r.text
        yield api, url


def _sample(api: Api, name: str, labels: dict[str, str] | None = None) -> float:
    return api.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_openai_parse_regex_and_choice_in_one_batch_of_several_tasks(served):
    import openai

    api, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="acme-manage-key", max_retries=0, timeout=120)
    ticket_format = {
        "type": "json_schema",
        "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA, "strict": True},
    }

    def parse(text: str):
        return client.chat.completions.parse(
            model="reviews",
            messages=[{"role": "user", "content": text}],
            response_format=Review,
            max_tokens=150,
            temperature=0,
        )

    def dates():  # sampled, two sequences, seeded, nucleus
        return client.completions.create(
            model="dates", prompt="Due on", max_tokens=30, n=2, seed=5, temperature=0.9, top_p=0.95,
            extra_body={"structured_outputs": {"regex": DATE_REGEX}},
        )  # fmt: skip

    def answer():
        return client.completions.create(
            model="answers", prompt="Is it open?", max_tokens=10, temperature=0, logprobs=2,
            extra_body={"structured_outputs": {"choice": CHOICES}},
        )  # fmt: skip

    def ticket_stream():
        return list(
            client.chat.completions.create(
                model="reviews", messages=[{"role": "user", "content": "Printer broken"}],
                response_format=ticket_format, max_tokens=150, temperature=0, stream=True,
            )
        )  # fmt: skip

    def free_long():  # unconstrained, on a fourth task, for as long as the others run
        return client.completions.create(
            model="notes", prompt="Once", max_tokens=160, temperature=0, extra_body={"ignore_eos": True}
        )

    def chats() -> dict:  # one at a time: a tenant renders one chat template at once (2 workers)
        return {"parsed": [parse(t) for t in ("Great film", "Awful food")], "stream": ticket_stream()}

    def run_all() -> dict:
        with ThreadPoolExecutor(4) as pool:
            long = pool.submit(free_long)
            futures = [pool.submit(chats), pool.submit(dates), pool.submit(answer)]
            out = {**futures[0].result(), "dates": futures[1].result(), "answer": futures[2].result()}
            out["long"] = long.result()
        return out

    # First round: compiles every constraint (workers start); the second finds them cached, so its
    # requests all reach the engine at once and share steps with the long free one.
    first = await asyncio.to_thread(run_all)
    hits_before = _sample(api, "prefixserve_grammar_cache_hits_total")
    second = await asyncio.to_thread(run_all)
    for out in (first, second):
        for completion in out["parsed"]:
            message = completion.choices[0].message
            assert isinstance(message.parsed, Review), message.content
            check_json(message.content, review_schema())
            assert completion.choices[0].finish_reason == "stop"
        assert len(out["dates"].choices) == 2
        for choice in out["dates"].choices:
            check_regex(choice.text, DATE_REGEX)
        choice = out["answer"].choices[0]
        check_choice(choice.text, CHOICES)
        assert len(choice.logprobs.tokens) == out["answer"].usage.completion_tokens
        check_json(
            "".join(c.choices[0].delta.content or "" for c in out["stream"] if c.choices), TICKET_SCHEMA
        )
        assert out["long"].usage.completion_tokens == 160
    # Greedy answers are the same both times; the seeded samples too.
    assert [c.choices[0].message.content for c in first["parsed"]] == [
        c.choices[0].message.content for c in second["parsed"]
    ]
    assert [c.text for c in first["dates"].choices] == [c.text for c in second["dates"].choices]
    # Metrics: the second round's constrained requests (6, n=2 counts twice) all hit the cache.
    assert _sample(api, "prefixserve_grammar_cache_hits_total") - hits_before == 6
    assert _sample(api, "prefixserve_structured_requests_total", {"kind": "choice"}) == 2
    assert _sample(api, "prefixserve_grammar_compile_seconds_count") >= 4  # review, ticket, regex, choice
    # Several tasks' rows shared a step: some step had at least three distinct tasks.
    steps = _sample(api, "prefixserve_batch_tasks_count")
    assert steps - _sample(api, "prefixserve_batch_tasks_bucket", {"le": "2.0"}) > 0


async def test_tgi_and_lorax_clients_constrain_with_their_own_fields(served):
    from lorax import Client as LoraxClient
    from lorax.types import ResponseFormat
    from text_generation import Client as TgiClient
    from text_generation.types import Grammar, GrammarType

    _, url = served
    headers = {"Authorization": "Bearer acme-manage-key"}
    tgi = TgiClient(url, headers=headers, timeout=120)
    lorax = LoraxClient(url, headers=headers, timeout=120)

    def run() -> dict:
        return {
            "tgi_json": tgi.generate(
                "Ticket:", max_new_tokens=120, grammar=Grammar(type=GrammarType.Json, value=TICKET_SCHEMA)
            ),
            "tgi_regex": list(
                tgi.generate_stream(
                    "Code:", max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=CODE_REGEX)
                )
            ),
            "lorax_json": lorax.generate(
                "Ticket:",
                adapter_id="reviews",
                max_new_tokens=120,
                response_format={"type": "json_object", "schema": TICKET_SCHEMA},
            ),
            "lorax_stream": list(
                lorax.generate_stream(
                    "Ticket:",
                    adapter_id="dates",
                    max_new_tokens=120,
                    do_sample=True,
                    seed=3,
                    response_format=ResponseFormat(type="json_object", schema=TICKET_SCHEMA),
                )
            ),
        }

    out = await asyncio.to_thread(run)
    check_json(out["tgi_json"].generated_text, TICKET_SCHEMA)
    assert out["tgi_json"].details.finish_reason == "eos_token"
    check_regex(out["tgi_regex"][-1].generated_text, CODE_REGEX)
    assert (
        "".join(t.token.text for t in out["tgi_regex"] if not t.token.special)
        == out["tgi_regex"][-1].generated_text
    )
    check_json(out["lorax_json"].generated_text, TICKET_SCHEMA)
    check_json(out["lorax_stream"][-1].generated_text, TICKET_SCHEMA)


async def test_native_route_aliases_stop_and_a_cut_answer(served):
    api, url = served
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def complete(**body) -> dict:
            r = await client.post(
                "/v1/completions", json={"model": "dates", "prompt": "Due on", **body}, headers=ACME
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        async def generate(parameters: dict) -> dict:
            body = {"task": "answers", "inputs": "Say", "parameters": {"details": True, **parameters}}
            r = await client.post("/v1/generate", json=body, headers=ACME)
            assert r.status_code == 200, r.text
            return r.json()

        # vLLM's older field names, still sent by older clients.
        check_regex((await complete(max_tokens=30, guided_regex=DATE_REGEX))["text"], DATE_REGEX)
        check_choice((await complete(max_tokens=10, guided_choice=CHOICES))["text"], CHOICES)
        check_json((await complete(max_tokens=150, guided_json=TICKET_SCHEMA))["text"], TICKET_SCHEMA)
        # OpenAI's response_format on completions (vLLM accepts it there), and json_object.
        ticket = {"type": "json_schema", "json_schema": {"name": "t", "schema": TICKET_SCHEMA}}
        check_json((await complete(max_tokens=150, response_format=ticket))["text"], TICKET_SCHEMA)
        # max_tokens still bounds the answer: cut, "length", a prefix of a valid answer only.
        cut = await complete(max_tokens=3, response_format=ticket)
        assert cut["finish_reason"] == "length" and cut["text"].startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut["text"])
        # A stop sequence ends a constrained answer as any other.
        stopped = await complete(max_tokens=30, structured_outputs={"regex": DATE_REGEX}, stop=["-"])
        assert (
            stopped["finish_reason"] == "stop"
            and len(stopped["text"]) == 4
            and stopped["text"].startswith("20")
        )
        # Our own route: vLLM's structured_outputs in `parameters` (choice, EBNF grammar), TGI's grammar.
        chosen = await generate(
            {"max_new_tokens": 10, "structured_outputs": {"choice": CHOICES}, "top_n_tokens": 2}
        )
        check_choice(chosen["generated_text"], CHOICES)
        assert all(len(top) == 2 for top in chosen["details"]["top_tokens"])
        expr = await generate(
            {"max_new_tokens": 20, "structured_outputs": {"grammar": 'root ::= "a" [0-9] [0-9]'}}
        )
        check_regex(expr["generated_text"], r"a[0-9]{2}")
        tgi = await generate({"max_new_tokens": 20, "grammar": {"type": "regex", "value": CODE_REGEX}})
        check_regex(tgi["generated_text"], CODE_REGEX)
        # Compact JSON on request: no whitespace outside strings.
        compact = await complete(
            max_tokens=150, structured_outputs={"json": TICKET_SCHEMA, "disable_any_whitespace": True}
        )
        check_json(compact["text"], TICKET_SCHEMA)
        assert not re.search(r"\s", re.sub(r'"(?:\\.|[^"\\])*"', "", compact["text"])), compact["text"]

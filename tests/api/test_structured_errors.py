"""A constraint we cannot serve is refused with a 400 that says why, and changes nothing: an invalid
JSON schema, a keyword the grammar library would ignore (named, with where it is), a regex or grammar
that does not compile, two constraints at once, a compile beyond its time or memory bound. Before this,
/v1/completions silently dropped `response_format` and `structured_outputs` (a 200 with free text)."""

from __future__ import annotations

from typing import Any

from server.engine import EngineConfig
from server.limits import Limits
from tests.api.conftest import ACME
from tests.api.structured_cases import CHOICES, TICKET_SCHEMA, check_choice

NOT_SCHEMA = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}

# (completions body fields, what the message names)
REFUSED: list[tuple[dict[str, Any], list[str]]] = [
    ({"structured_outputs": {"json": {"type": "foo"}}}, ["invalid JSON schema", "'/type'"]),
    ({"structured_outputs": {"json": "{nope"}}, ["not valid JSON"]),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": NOT_SCHEMA}}},
        ["keyword 'not' is not supported", "/properties/a"],
    ),
    ({"guided_json": {"type": "string", "format": "ipv5"}}, ["format 'ipv5' is not supported"]),
    ({"guided_json": {"$ref": "https://example.com/s.json"}}, ["points outside the schema"]),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, ["'uniqueItems'"]),
    (
        {"guided_json": {"type": "string", "pattern": "^a+$", "maxLength": 3}},
        ["'maxLength' together with 'pattern'"],
    ),
    ({"structured_outputs": {"regex": "(abc"}}, ["regex does not compile", "parenthesis"]),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, ["grammar does not compile", "missing"]),
    ({"structured_outputs": {"choice": []}}, ["choice needs 1"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, ["exactly one of", "structured_outputs.regex"]),
    (
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
        ["two constraints at once", "response_format and structured_outputs"],
    ),
    ({"guided_json": TICKET_SCHEMA, "guided_regex": "a+"}, ["two constraints at once"]),
    ({"structured_outputs": {"regex": "a+", "whitespace_pattern": " ?"}}, ["whitespace_pattern"]),
    ({"structured_outputs": {"choice": CHOICES}, "ignore_eos": True}, ["ignore_eos"]),
]


async def test_constraints_that_cannot_be_served_get_400_with_the_reason_and_change_nothing(
    make_api, tmp_path
):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    api = await make_api(chat_template=template)
    finished_before = api.metrics.registry.get_sample_value(
        "prefixserve_request_finish_total", {"finish_reason": "eos_token"}
    )
    for fields, named in REFUSED:
        body = {"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 8, **fields}
        r = await api.client.post("/v1/completions", json=body, headers=ACME)
        assert r.status_code == 400, (fields, r.text)
        message = r.json()["error"]["message"]
        assert all(part in message for part in named), (named, message)
    # Chat and the TGI routes refuse the same way (each in its own error shape).
    chat = await api.client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-gpt2",
            "messages": [{"role": "user", "content": "x"}],
            "structured_outputs": {"regex": "(x"},
        },
        headers=ACME,
    )
    assert chat.status_code == 400 and "regex does not compile" in chat.json()["error"]["message"], chat.text
    tgi = await api.client.post(
        "/generate",
        json={"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(x"}}},
        headers=ACME,
    )
    assert tgi.status_code == 400 and "regex does not compile" in tgi.json()["error"], tgi.text
    both = {"grammar": {"type": "regex", "value": "a+"}, "response_format": {"type": "json_object"}}
    native = await api.client.post("/v1/generate", json={"inputs": "Hi", "parameters": both}, headers=ACME)
    assert (
        native.status_code == 400
        and "parameters.grammar and parameters.response_format" in native.json()["error"]
    )
    # Nothing reached the queue or was cached, nothing finished; the invalid compiles were counted.
    assert api.engine.num_waiting == 0 and api.engine.num_running == 0
    assert api.engine.grammars.cached == 0
    finished = api.metrics.registry.get_sample_value(
        "prefixserve_request_finish_total", {"finish_reason": "eos_token"}
    )
    assert finished == finished_before
    assert (
        api.metrics.registry.get_sample_value("prefixserve_grammar_compiles_total", {"outcome": "invalid"})
        >= 8
    )
    # A refusal remembered costs no worker the second time; and the server serves a good constraint.
    compiles = api.metrics.registry.get_sample_value("prefixserve_grammar_compile_seconds_count")
    again = await api.client.post(
        "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": "Hi", "guided_json": NOT_SCHEMA},
        headers=ACME,
    )
    assert again.status_code == 400 and "'not'" in again.json()["error"]["message"]
    assert api.metrics.registry.get_sample_value("prefixserve_grammar_compile_seconds_count") == compiles
    good = await api.client.post(
        "/v1/completions",
        json={
            "model": "tiny-gpt2",
            "prompt": "Hi",
            "max_tokens": 8,
            "structured_outputs": {"choice": CHOICES},
        },
        headers=ACME,
    )
    assert good.status_code == 200, good.text
    check_choice(good.json()["choices"][0]["text"], CHOICES)


async def test_a_compile_beyond_its_time_or_memory_bound_is_refused(make_api):
    # 60,000 enum values: seconds and hundreds of MB to compile against GPT-2's vocabulary.
    big_enum = {"enum": [f"value-{i}" for i in range(60_000)]}
    slow = await make_api(
        engine_config=EngineConfig(
            Limits(grammar_compile_timeout_s=1, queue_timeout_s=120, max_json_body_bytes=4 << 20)
        ),
        max_json_body_bytes=4 << 20,
    )
    body = {"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 4, "guided_json": big_enum}
    r = await slow.client.post("/v1/completions", json=body, headers=ACME)
    assert r.status_code == 400, r.text
    # The deadline, or the memory cap where a fast CPU gets there first: the refusal names its setting.
    message = r.json()["error"]["message"]
    timed_out = "did not compile within 1 s" in message and "GRAMMAR_COMPILE_TIMEOUT_S" in message
    capped = "needed more memory" in message and "GRAMMAR_COMPILE_MAX_MEMORY_BYTES=" in message
    assert timed_out or capped, message
    outcome = "timeout" if timed_out else "memory"
    samples = slow.metrics.registry.get_sample_value
    assert samples("prefixserve_grammar_compiles_total", {"outcome": outcome}) == 1
    small = await make_api(
        engine_config=EngineConfig(
            Limits(
                grammar_compile_max_memory_bytes=32 << 20, grammar_compile_timeout_s=120, queue_timeout_s=120
            )
        ),
        max_json_body_bytes=4 << 20,
    )
    r = await small.client.post("/v1/completions", json=body, headers=ACME)
    assert r.status_code == 400, r.text
    assert "memory" in r.json()["error"]["message"], r.text
    # The worker that ran out was replaced: the same server compiles a small constraint next.
    ok = await small.client.post(
        "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 8, "guided_choice": CHOICES},
        headers=ACME,
    )
    assert ok.status_code == 200, ok.text
    check_choice(ok.json()["choices"][0]["text"], CHOICES)

"""Generation routes: native `/v1/generate*`, TGI's `/generate*` and `/`, and their errors."""

from __future__ import annotations

import json
import re

from tests.api.conftest import ACME, artifact_bytes


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data:") :]) for line in text.splitlines() if line.startswith("data:")]


async def test_generate_base_model_greedy_is_deterministic(make_api):
    api = await make_api()
    first = await api.generate("The weather today", max_new_tokens=6)
    second = await api.generate("The weather today", max_new_tokens=6)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["generated_text"] == second.json()["generated_text"]
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 6
    assert details["prefix_version"] is None
    assert len(details["tokens"]) == 6
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
    assert {"id", "text", "logprob", "special"} <= set(details["tokens"][0])


async def test_details_only_when_asked_and_full_text(make_api):
    api = await make_api()
    r = await api.client.post(
        "/v1/generate", json={"inputs": "Hi there", "parameters": {"max_new_tokens": 3}}, headers=ACME
    )
    assert r.status_code == 200
    assert r.json()["details"] is None
    full = await api.client.post(
        "/v1/generate",
        json={"inputs": "Hi there", "parameters": {"max_new_tokens": 3, "return_full_text": True}},
        headers=ACME,
    )
    assert full.json()["generated_text"] == "Hi there" + r.json()["generated_text"]


async def test_seeded_sampling_is_reproducible(make_api):
    api = await make_api()
    params = {"do_sample": True, "temperature": 1.5, "top_k": 50, "seed": 1234, "max_new_tokens": 8}
    a = (await api.generate("Once upon a time", **params)).json()
    b = (await api.generate("Once upon a time", **params)).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 1234


async def test_stream_is_tgi_format(make_api):
    api = await make_api()
    expected = (await api.generate("Stream me", max_new_tokens=5)).json()
    r = await api.client.post(
        "/v1/generate_stream", json={"inputs": "Stream me", "parameters": {"max_new_tokens": 5}}, headers=ACME
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"]
    events = sse_events(r.text)
    assert len(events) == 5
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
    final = events[-1]
    assert final["generated_text"] == expected["generated_text"]
    assert final["details"]["finish_reason"] == "length"
    assert final["details"]["generated_tokens"] == 5
    assert [e["token"]["id"] for e in events] == [t["id"] for t in expected["details"]["tokens"]]


async def test_tgi_aliases_take_the_task_from_adapter_id(make_api, loaded):
    api = await make_api()
    assert (await api.upload("tgi-task", artifact_bytes(loaded.spec, 5))).status_code == 201
    native = (await api.generate("Same prompt", task="tgi-task")).json()
    body = {
        "inputs": "Same prompt",
        "parameters": {"max_new_tokens": 8, "details": True, "adapter_id": "tgi-task"},
    }
    tgi = await api.client.post("/generate", json=body, headers=ACME)
    assert tgi.status_code == 200
    assert tgi.json()["generated_text"] == native["generated_text"]
    assert tgi.json()["details"]["prefix_version"] == 1
    compat = await api.client.post("/", json={**body, "stream": False}, headers=ACME)
    assert compat.status_code == 200 and isinstance(compat.json(), list)
    assert compat.json()[0]["generated_text"] == native["generated_text"]
    stream = await api.client.post("/generate_stream", json=body, headers=ACME)
    assert sse_events(stream.text)[-1]["generated_text"] == native["generated_text"]
    info = await api.client.get("/info")
    assert info.status_code == 200 and info.json()["max_total_tokens"] == loaded.spec.max_positions


async def test_unknown_task_is_404(make_api):
    api = await make_api()
    r = await api.generate("x", task="no-such-task")
    assert r.status_code == 404
    assert r.json()["error_type"] == "not_found"
    assert "no-such-task" in r.json()["error"]
    stream = await api.client.post("/v1/generate_stream", json={"task": "nope", "inputs": "x"}, headers=ACME)
    assert stream.status_code == 404  # errors before the first token are real statuses, even on streams


async def test_invalid_parameters_and_unknown_fields_are_422(make_api):
    api = await make_api()
    cases = [
        {"inputs": "x", "parameters": {"num_beams": 4}},
        {"inputs": "x", "parameters": {"best_of": 2}},
        {"inputs": "x", "parameters": {"max_new_tokens": 0}},
        {"inputs": "x", "parameters": {"top_p": 1.5}},
        {"inputs": "x", "parameters": {"temperature": 0}},
        {"inputs": "x", "parameters": {"bogus": 1}},
        {"inputs": "x", "unknown_field": True},
        {"inputs": ""},
        {"parameters": {}},
        {"inputs": "x", "task": "../etc/passwd"},
    ]
    for body in cases:
        r = await api.client.post("/v1/generate", json=body, headers=ACME)
        assert r.status_code == 422, (body, r.text)
        assert set(r.json()) == {"error", "error_type"}
        assert r.json()["error_type"] == "validation"
        assert "Traceback" not in r.text


async def test_prompt_too_long_names_the_numbers(make_api, loaded):
    api = await make_api()
    limit = loaded.spec.max_positions
    r = await api.generate("hello " * 300, max_new_tokens=400)
    assert r.status_code == 422
    message = r.json()["error"]
    assert re.search(r"\d{3} prompt tokens", message), message
    assert "max_new_tokens 400" in message and str(limit) in message


async def test_malformed_json_and_non_utf8_are_4xx(make_api):
    api = await make_api()
    headers = {**ACME, "content-type": "application/json"}
    bad_json = await api.client.post("/v1/generate", content=b'{"inputs": "x",', headers=headers)
    assert bad_json.status_code == 422 and bad_json.json()["error_type"] == "validation"
    not_utf8 = await api.client.post("/v1/generate", content=b'{"inputs": "\xff\xfe"}', headers=headers)
    assert 400 <= not_utf8.status_code < 500
    assert set(not_utf8.json()) == {"error", "error_type"}


async def test_request_id_is_echoed_or_made(make_api):
    api = await make_api()
    mine = await api.client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    hostile = await api.client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    missing = await api.client.get("/no/such/path")
    assert missing.status_code == 404 and missing.headers["x-request-id"]
    assert missing.json()["error_type"] == "not_found"
    # Two concurrent requests may carry the same client id: the engine gets unique ids anyway.
    same = {**ACME, "X-Request-Id": "retry-1"}
    a = await api.client.post("/v1/generate", json={"inputs": "a"}, headers=same)
    b = await api.client.post("/v1/generate", json={"inputs": "a"}, headers=same)
    assert a.status_code == b.status_code == 200


async def _post_then_disconnect(app, path: str, body: dict, headers: dict, disconnect) -> list[dict]:
    """Drive the ASGI app directly: send the body, then `http.disconnect` once `disconnect()` returns."""
    import asyncio

    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": raw_headers, "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    sent: list[dict] = []
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await disconnect()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return sent


async def test_non_streamed_generation_is_aborted_when_the_client_disconnects(make_api, loaded):
    """A client that hangs up on /v1/generate or /v1/completions frees its row and its tenant slot at
    once; the engine does not generate the remaining tokens for nobody."""
    import asyncio
    import time

    from tests.api.conftest import wait_for

    api = await make_api(tenant_max_concurrent=1)
    if api.engine.backend == "native":
        real_decode = api.engine.runner.decode

        def slow_decode(tokens):  # ~20 ms a step: 400 tokens would take 8 s
            time.sleep(0.02)
            return real_decode(tokens)

        api.engine.runner.decode = slow_decode
    # vLLM (its steps run in its own process) takes seconds for 400 tokens of the tiny model on CPU.
    generated = api.metrics.generation_tokens

    async def hang_up_once_running() -> None:
        await wait_for(lambda: api.engine.num_running == 1, 10.0, "the request to run")
        await asyncio.sleep(0.1)

    cases = [
        ("/v1/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 400}}),
        ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 400}}),
        ("/v1/completions", {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 400}),
    ]
    for path, body in cases:
        t0, tokens_before = time.monotonic(), generated._value.get()
        await _post_then_disconnect(api.app, path, body, ACME, hang_up_once_running)
        assert time.monotonic() - t0 < 5.0, path
        await wait_for(lambda: api.engine.num_running == 0, 5.0, "the row to be freed")
        assert generated._value.get() - tokens_before < 400, path  # not the whole generation
        if api.engine.backend == "vllm":  # vLLM itself dropped the request too
            await wait_for(
                lambda: api.engine.llm.output_processor.get_num_unfinished_requests() == 0,
                5.0,
                "vLLM to abort it",
            )
        # The tenant's only concurrency slot was released: the next request is admitted.
        r = await api.generate("Hello", max_new_tokens=2)
        assert r.status_code == 200, (path, r.text)
    finish = api.metrics.request_finish.labels(finish_reason="cancelled")._value.get()
    assert finish == len(cases)

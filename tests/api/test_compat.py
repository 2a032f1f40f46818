"""Compatibility details users of vLLM, TGI and LoRAX notice: tokenizer routes, model cards, task-aware
limits, how unknown and neutral-only fields are treated, chat templates, prompt logprobs."""

from __future__ import annotations

import json
import logging

import torch

from prefix_store.artifact import dump_artifact, new_artifact
from tests.api.conftest import ACME, GLOBEX, artifact_bytes

PREFIX_LEN = 6


async def _api_with_task(make_api, loaded, **overrides):  # type: ignore[no-untyped-def]
    api = await make_api(**overrides)
    r = await api.upload("poems", artifact_bytes(loaded.spec, 7, length=PREFIX_LEN))
    assert r.status_code == 201, r.text
    return api


async def test_tokenize_in_tgi_and_vllm_shapes_and_detokenize(make_api, loaded):
    api = await _api_with_task(make_api, loaded)
    text = "Hello world, again"
    tgi = await api.client.post(
        "/tokenize", json={"inputs": text, "parameters": {"adapter_id": "poems"}}, headers=ACME
    )
    assert tgi.status_code == 200, tgi.text
    spans = tgi.json()
    assert "".join(s["text"] for s in spans) == text
    assert all(text[s["start"] : s["stop"]] == s["text"] for s in spans)
    ids = [s["id"] for s in spans]
    assert ids == loaded.tokenizer.encode(text)

    vllm = await api.client.post("/tokenize", json={"prompt": text, "model": "poems"}, headers=ACME)
    assert vllm.json() == {
        "tokens": ids,
        "count": len(ids),
        "max_model_len": loaded.spec.max_positions - PREFIX_LEN,
    }
    base = await api.client.post("/tokenize", json={"prompt": text}, headers=ACME)
    assert base.json()["max_model_len"] == loaded.spec.max_positions

    back = await api.client.post("/detokenize", json={"tokens": ids}, headers=ACME)
    assert back.json() == {"prompt": text}
    bad = await api.client.post("/detokenize", json={"tokens": [10**9]}, headers=ACME)
    assert bad.status_code == 422 and "token ids" in bad.json()["error"]
    unknown = await api.client.post("/tokenize", json={"prompt": "x", "model": "nope"}, headers=ACME)
    assert unknown.status_code == 404
    assert (await api.client.post("/tokenize", json={"inputs": "x"})).status_code == 401
    version = await api.client.get("/version")
    assert version.status_code == 200 and version.json()["version"]


async def test_models_list_tasks_as_adapters_of_the_base_model_and_info_is_task_aware(make_api, loaded):
    api = await _api_with_task(make_api, loaded)
    base_id = api.app.state.prefixserve.config.model_id
    cards = (await api.client.get("/v1/models", headers=ACME)).json()["data"]
    positions = loaded.spec.max_positions
    assert cards[0] | {"created": 0} == {
        "id": base_id,
        "object": "model",
        "created": 0,
        "owned_by": "prefixserve",
        "root": base_id,
        "parent": None,
        "max_model_len": positions,
    }
    assert cards[1]["id"] == "poems" and cards[1]["parent"] == base_id
    assert cards[1]["max_model_len"] == positions - PREFIX_LEN

    info = (await api.client.get("/info")).json()
    assert info["max_input_tokens"] == positions - 1
    task_info = await api.client.get("/info", params={"adapter_id": "poems"}, headers=ACME)
    assert task_info.json()["max_input_tokens"] == positions - PREFIX_LEN - 1
    assert task_info.json()["max_total_tokens"] == positions - PREFIX_LEN
    # The task is acme's: another tenant does not learn it exists; without a key, no task lookup.
    assert (await api.client.get("/info", params={"adapter_id": "poems"}, headers=GLOBEX)).status_code == 404
    assert (await api.client.get("/info", params={"adapter_id": "poems"})).status_code == 401


async def test_unknown_fields_warned_and_ignored_on_compat_routes_refused_on_native(make_api, caplog):
    api = await make_api()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "min_p": 0.1}, "extra_top": 1}
    with caplog.at_level(logging.WARNING):
        compat = await api.client.post("/generate", json=body, headers=ACME)
    assert compat.status_code == 200, compat.text
    warned = [r for r in caplog.records if r.getMessage() == "ignoring unknown request fields"]
    assert warned and sorted(warned[0].fields) == ["extra_top", "parameters.min_p"]  # type: ignore[attr-defined]
    plain = await api.client.post(
        "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, headers=ACME
    )
    assert compat.json() == plain.json()  # ignored, not reinterpreted
    native = await api.client.post("/v1/generate", json=body, headers=ACME)
    assert native.status_code == 422 and "parameters.min_p" in native.json()["error"]
    completion = await api.client.post(
        "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 2, "min_p": 0.5},
        headers=ACME,
    )
    assert completion.status_code == 200, completion.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        chat = await api.client.post(
            "/v1/chat/completions",
            json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            headers=ACME,
        )
    assert chat.status_code == 400  # no template here; the unknown message field was still reported
    warned = [r for r in caplog.records if r.getMessage() == "ignoring unknown request fields"]
    assert warned and warned[0].fields == ["messages[0].tool_calls"]  # type: ignore[attr-defined]


async def test_neutral_values_accepted_others_refused_with_the_reason(make_api):
    api = await make_api()
    lorax_defaults = {
        "adapter_source": None,
        "merged_adapters": None,
        "api_token": None,
        "ignore_eos_token": False,
        "response_format": None,
        "return_k_alternatives": None,
        "watermark": False,
        "grammar": None,
        "max_new_tokens": None,
    }
    ok = await api.client.post("/generate", json={"inputs": "Hi", "parameters": lorax_defaults}, headers=ACME)
    assert ok.status_code == 200, ok.text
    refused = {
        "adapter_source": ("hub", "loading from hub"),
        "merged_adapters": ({"ids": ["a", "b"], "weights": [0.5, 0.5], "density": 1.0}, "merging adapters"),
        "watermark": (True, "watermarking"),
    }
    for field, (value, reason) in refused.items():
        r = await api.client.post(
            "/generate", json={"inputs": "Hi", "parameters": {field: value}}, headers=ACME
        )
        assert r.status_code == 422, (field, r.text)
        assert reason in r.json()["error"] and "not supported" in r.json()["error"], r.text
    suffix = await api.client.post(
        "/v1/completions", json={"model": "tiny-gpt2", "prompt": "Hi", "suffix": "end"}, headers=ACME
    )
    assert suffix.status_code == 422 and "suffix" in suffix.json()["error"]["message"]
    usage_without_stream = await api.client.post(
        "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": "Hi", "stream_options": {"include_usage": True}},
        headers=ACME,
    )
    assert usage_without_stream.status_code == 422


async def test_chat_needs_a_template_and_uses_the_task_s_own(make_api, loaded):
    api = await make_api()
    messages = [{"role": "user", "content": "Hi"}]
    r = await api.client.post(
        "/v1/chat/completions", json={"model": "tiny-gpt2", "messages": messages}, headers=ACME
    )
    assert r.status_code == 400
    assert "PREFIXSERVE_CHAT_TEMPLATE" in r.json()["error"]["message"]
    # A task whose artifact carries its own template is served with it.
    prefix = torch.randn(loaded.spec.num_layers, 2, loaded.spec.num_heads, 4, loaded.spec.head_dim)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}"
    artifact = new_artifact(
        {"decoder": prefix}, loaded.spec, task="chatty", training={"chat_template": template}
    )
    assert (await api.upload("chatty", dump_artifact(artifact))).status_code == 201
    chat = await api.client.post(
        "/v1/chat/completions",
        json={"model": "chatty", "messages": messages, "max_tokens": 4, "temperature": 0},
        headers=ACME,
    )
    assert chat.status_code == 200, chat.text
    rendered = "<user>Hi<|endoftext|>"
    reference = await api.generate(rendered, task="chatty", max_new_tokens=4)
    assert chat.json()["choices"][0]["message"]["content"] == reference.json()["generated_text"]
    assert chat.json()["usage"]["prompt_tokens"] == len(loaded.tokenizer.encode(rendered))


async def test_prompt_logprobs_are_the_model_s(make_api, loaded):
    api = await make_api()
    prompt = "The quick brown fox jumps"
    r = await api.generate(prompt, max_new_tokens=1, decoder_input_details=True)
    prefill = r.json()["details"]["prefill"]
    ids = loaded.tokenizer.encode(prompt)
    assert [p["id"] for p in prefill] == ids and prefill[0]["logprob"] is None
    with torch.no_grad():
        logp = loaded.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [P, V]
    for i in range(1, len(ids)):
        assert abs(prefill[i]["logprob"] - float(logp[i - 1, ids[i]])) < 1e-4


async def test_logit_bias_steers_greedy_output_and_bad_ids_are_refused(make_api):
    api = await make_api()
    body = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    plain = (await api.client.post("/v1/completions", json=body, headers=ACME)).json()["choices"][0]["text"]
    forced = await api.client.post("/v1/completions", json=body | {"logit_bias": {"11": 100}}, headers=ACME)
    assert forced.json()["choices"][0]["text"] == "," * 6  # token 11 is ","
    assert plain != forced.json()["choices"][0]["text"]
    bad = await api.client.post("/v1/completions", json=body | {"logit_bias": {"999999": 1}}, headers=ACME)
    assert bad.status_code == 422 and "logit_bias" in bad.json()["error"]["message"]


async def test_streamed_n_sequences_arrive_by_index_and_equal_the_unstreamed(make_api):
    api = await make_api()
    body = {"model": "tiny-gpt2", "prompt": "Once upon", "max_tokens": 5, "n": 2, "seed": 9}
    whole = (await api.client.post("/v1/completions", json=body, headers=ACME)).json()
    stream = await api.client.post(
        "/v1/completions",
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
        headers=ACME,
    )
    chunks = [
        json.loads(line[5:])
        for line in stream.text.splitlines()
        if line.startswith("data:") and "[DONE]" not in line
    ]
    texts = ["", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert texts[0] != texts[1]  # seeds 9 and 10
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

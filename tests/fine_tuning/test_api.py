"""The fine-tuning API without a worker: bad input is refused (or fails the job while its files are
validated) and changes nothing, tenants see only their own files and jobs, the per-tenant limits
hold, listings page newest first, and cancel / pause / resume follow the job's state.

In-process apps (`make_api`: a real engine on the tiny GPT-2, a local store and job store in a tmp
dir); a job's files are validated by the app's own background work, as on a server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import torch

from prefix_store.artifact import dump_artifact, new_artifact
from tests.fine_tuning.conftest import ACME, ACME_GEN, GLOBEX, colors_file, hyper, jsonl
from training.job_data import chat_template, render_chat

MODEL = "tiny-gpt2"  # make_api's served model id


async def upload(api: Any, data: bytes, filename: str = "train.jsonl", headers: dict[str, str] = ACME,
                 purpose: str = "fine-tune") -> httpx.Response:  # fmt: skip
    files = {"file": (filename, data, "application/jsonl")}
    return await api.client.post("/v1/files", data={"purpose": purpose}, files=files, headers=headers)


async def new_file(api: Any, data: bytes | None = None, headers: dict[str, str] = ACME) -> str:
    response = await upload(api, data if data is not None else colors_file(), headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def create(api: Any, headers: dict[str, str] = ACME, **body: Any) -> httpx.Response:
    return await api.client.post("/v1/fine_tuning/jobs", json={"model": MODEL, **body}, headers=headers)


async def settled(api: Any, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job once it has left `validating_files`."""
    deadline = time.monotonic() + timeout
    while True:
        job = (await api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ACME)).json()
        if job["status"] != "validating_files":
            return job
        assert time.monotonic() < deadline, f"job {job_id} still validating after {timeout}s"
        await asyncio.sleep(0.05)


async def listed(api: Any, path: str, headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
    response = await api.client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def openai_error(response: httpx.Response) -> dict[str, Any]:
    return dict(response.json()["error"])


async def test_bad_training_files_are_refused_with_the_line_and_nothing_is_stored(make_api):
    api = await make_api(max_training_file_bytes=2048)
    good = {"prompt": "red", "completion": "apple pie"}
    cases = {
        "malformed JSON": (
            jsonl([good]) + b'{"prompt": "blue", "completion": \n',
            400,
            "line 2: not valid JSON",
        ),
        "wrong field": (
            jsonl([good, {"promt": "x", "completion": "y"}]),
            400,
            "line 2: unknown field(s) 'promt'",
        ),
        "missing field": (jsonl([{"prompt": "x"}]), 400, "line 1: missing 'completion'"),
        "mixed shapes": (jsonl([good, {"source": "a", "target": "b"}]), 400, "line 2: a source_target line"),
        "empty value": (
            jsonl([good, {"prompt": "x", "completion": " "}]),
            400,
            "line 2: 'completion' is empty",
        ),
        "not an object": (b'["red", "apple pie"]\n', 400, "line 1: expected a JSON object"),
        "chat not ending with the assistant": (
            jsonl(
                [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}]
            ),
            400,
            "line 1: the last message must be the assistant's",
        ),
        "empty file": (b"\n \n", 400, "the file is empty"),
        "not UTF-8": (b'{"prompt": "\xff", "completion": "x"}\n', 400, "line 1: not UTF-8"),
        "bad E2E row": (b"mr,ref\nnot an mr,ref text\n", 400, "line 2: 'mr'"),
        "too large": (jsonl([good] * 100), 413, "exceeds the limit of 2048 bytes"),
    }
    for name, (data, status, reason) in cases.items():
        filename = "rows.csv" if name == "bad E2E row" else "rows.jsonl"
        response = await upload(api, data, filename)
        assert response.status_code == status, (name, response.text)
        error = openai_error(response)
        assert reason in error["message"], (name, error)
        assert error["param"] == "file", name
    wrong_purpose = await upload(api, jsonl([good]), purpose="batch")
    assert wrong_purpose.status_code == 400 and openai_error(wrong_purpose)["param"] == "purpose"
    assert await listed(api, "/v1/files") == []


async def test_bad_job_requests_are_refused_naming_the_param_and_store_no_job(make_api):
    api = await make_api()
    file_id = await new_file(api)
    hp = "method.supervised.hyperparameters"
    cases = [
        ({"model": "gpt-4o-mini"}, "model", "unknown base model 'gpt-4o-mini'"),
        ({"method": hyper(prefix_length=0)}, f"{hp}.prefix_length", "prefix_length must be 1.."),
        ({"method": hyper(prefix_length=600)}, f"{hp}.prefix_length", "for this model, got 600"),
        ({"method": hyper(mlp_hidden=0)}, f"{hp}.mlp_hidden", "mlp_hidden must be"),
        ({"method": hyper(n_epochs=0)}, f"{hp}.n_epochs", "n_epochs must be"),
        ({"method": hyper(learning_rate_multiplier=-1)}, f"{hp}.learning_rate_multiplier", "(0, 100]"),
        ({"method": hyper(prefix_lenght=4)}, f"{hp}.prefix_lenght", "Extra inputs are not permitted"),
        ({"method": hyper(init="text-fit")}, f"{hp}.init_text", "needs init_text"),
        ({"method": hyper(placement="peft")}, f"{hp}.placement", "encoder-decoder (BART) models only"),
        ({"method": {"type": "dpo"}}, "method.type", "Input should be 'supervised'"),
        ({"suffix": "no/slashes"}, "suffix", "invalid task"),
        ({"suffix": MODEL}, "suffix", "the served model's id"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "at most 0 items"),
    ]
    for fields, param, reason in cases:
        response = await create(api, training_file=file_id, **{"model": MODEL, **fields})
        assert response.status_code == 400, (fields, response.text)
        error = openai_error(response)
        assert error["param"] == param, (fields, error)
        assert reason in error["message"], (fields, error)
    missing = await create(api, training_file="file-" + "0" * 24)
    assert missing.status_code == 404 and openai_error(missing)["param"] == "training_file"
    assert await listed(api, "/v1/fine_tuning/jobs") == []


async def test_files_the_model_cannot_train_on_fail_the_job_while_validating(make_api):
    api = await make_api(max_training_tokens_per_job=500)
    long_prompt = " ".join(["word"] * 600)  # 600 tokens: truncated to 512, still beyond 512 positions
    too_long = await new_file(
        api, jsonl([{"prompt": "red", "completion": "apple"}, {"prompt": long_prompt, "completion": "x"}])
    )
    failed = await settled(api, (await create(api, training_file=too_long, suffix="long")).json()["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_training_file"
    assert failed["error"]["param"] == "training_file"
    assert f"training_file {too_long}: line 2:" in failed["error"]["message"]
    assert "the model has 512" in failed["error"]["message"]

    colors = await new_file(api)
    many = await settled(
        api, (await create(api, training_file=colors, method=hyper(n_epochs=50))).json()["id"]
    )
    assert many["status"] == "failed" and many["error"]["code"] == "exceeded_token_limit"
    assert "the limit per job is 500" in many["error"]["message"]

    other_shape = await new_file(api, jsonl([{"source": "red", "target": "apple pie"}]))
    mixed = await settled(
        api, (await create(api, training_file=colors, validation_file=other_shape)).json()["id"]
    )
    assert mixed["status"] == "failed" and mixed["error"]["param"] == "validation_file"
    assert "source_target" in mixed["error"]["message"]

    events = await listed(api, f"/v1/fine_tuning/jobs/{failed['id']}/events")
    assert events[0]["level"] == "error" and "Validation failed" in events[0]["message"]
    # Nothing trained, nothing stored.
    assert (await api.client.get("/v1/prefixes", headers=ACME)).json()["items"] == []


async def test_a_valid_job_is_queued_with_its_steps_and_resolved_hyperparameters(make_api):
    api = await make_api()
    file_id = await new_file(api)
    created = await create(api, training_file=file_id, suffix="colors", seed=7, metadata={"team": "x"},
                           method=hyper(n_epochs=3, batch_size=4))  # fmt: skip
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "validating_files"
    job = await settled(api, created.json()["id"])
    assert job["status"] == "queued" and job["error"] is None
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    extras = job["method"]["supervised"]["hyperparameters"]
    assert extras["prefix_length"] == 4 and extras["mlp_hidden"] == 32 and extras["init"] == "random"
    assert (job["seed"], job["metadata"], job["user_provided_suffix"], job["organization_id"]) == (
        7,
        {"team": "x"},
        "colors",
        "acme",
    )
    events = await listed(api, f"/v1/fine_tuning/jobs/{job['id']}/events")
    assert "6 steps" in events[0]["message"]  # 6 examples / batch 4 = 2 steps x 3 epochs


async def test_another_tenant_gets_404_and_the_generate_role_may_only_read(make_api):
    api = await make_api()
    file_id = await new_file(api)
    job_id = (await create(api, training_file=file_id)).json()["id"]
    client = api.client
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"),
    ]:
        response = await client.request(method, path, headers=GLOBEX)
        assert response.status_code == 404, (method, path, response.text)
    assert (await create(api, headers=GLOBEX, training_file=file_id)).status_code == 404
    assert (
        await listed(api, "/v1/files", GLOBEX) == []
        and await listed(api, "/v1/fine_tuning/jobs", GLOBEX) == []
    )

    assert (await upload(api, colors_file(), headers=ACME_GEN)).status_code == 403
    assert (await create(api, headers=ACME_GEN, training_file=file_id)).status_code == 403
    assert (await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ACME_GEN)).status_code == 403
    assert (await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ACME_GEN)).status_code == 200
    content = await client.get(f"/v1/files/{file_id}/content", headers=ACME_GEN)
    assert content.content == colors_file()
    assert (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).status_code == 401


async def test_per_tenant_file_and_queue_limits(make_api):
    api = await make_api(tenant_max_training_files=2, tenant_max_queued_jobs=1)
    first, _second = await new_file(api), await new_file(api)
    third = await upload(api, colors_file())
    assert third.status_code == 429 and "quota" in openai_error(third)["message"]
    assert len(await listed(api, "/v1/files")) == 2
    await new_file(api, headers=GLOBEX)  # another tenant's quota is its own

    assert (await create(api, training_file=first)).status_code == 200
    refused = await create(api, training_file=first)
    assert refused.status_code == 429 and "1 jobs waiting" in openai_error(refused)["message"]
    assert len(await listed(api, "/v1/fine_tuning/jobs")) == 1
    globex_file = await new_file(api, headers=GLOBEX)
    assert (await create(api, headers=GLOBEX, training_file=globex_file)).status_code == 200  # its own queue


async def test_listings_page_newest_first(make_api):
    api = await make_api()
    file_ids = [await new_file(api) for _ in range(3)]
    assert [f["id"] for f in await listed(api, "/v1/files")] == file_ids[::-1]
    job_ids = [(await create(api, training_file=file_ids[0])).json()["id"] for _ in range(3)]
    first = (await api.client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=ACME)).json()
    assert [j["id"] for j in first["data"]] == job_ids[:0:-1] and first["has_more"] is True
    rest = (
        await api.client.get(
            "/v1/fine_tuning/jobs", params={"limit": 2, "after": first["last_id"]}, headers=ACME
        )
    ).json()
    assert [j["id"] for j in rest["data"]] == job_ids[:1] and rest["has_more"] is False

    await settled(api, job_ids[0])
    await api.client.post(f"/v1/fine_tuning/jobs/{job_ids[0]}/cancel", headers=ACME)
    events = await listed(api, f"/v1/fine_tuning/jobs/{job_ids[0]}/events")
    assert [e["message"].split()[0] for e in events] == ["Job", "Files", "Created"]  # newest first
    older = (await api.client.get(f"/v1/fine_tuning/jobs/{job_ids[0]}/events",
                                  params={"limit": 1, "after": events[0]["id"]}, headers=ACME)).json()  # fmt: skip
    assert [e["id"] for e in older["data"]] == [events[1]["id"]] and older["has_more"] is True


async def test_cancel_pause_and_resume_follow_the_jobs_state(make_api):
    api = await make_api()
    file_id = await new_file(api)
    job_id = (await create(api, training_file=file_id)).json()["id"]
    await settled(api, job_id)
    post = api.client.post
    paused = await post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=ACME)
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert (await post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=ACME)).json()["status"] == "queued"
    not_paused = await post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=ACME)
    assert not_paused.status_code == 409 and "only a paused job" in openai_error(not_paused)["message"]

    in_use = await api.client.delete(f"/v1/files/{file_id}", headers=ACME)
    assert in_use.status_code == 409 and job_id in openai_error(in_use)["message"]

    cancelled = await post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ACME)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert (await post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ACME)).json()["status"] == "cancelled"
    assert (await post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=ACME)).status_code == 409

    deleted = await api.client.delete(f"/v1/files/{file_id}", headers=ACME)
    assert deleted.status_code == 200 and deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert (await api.client.get(f"/v1/files/{file_id}", headers=ACME)).status_code == 404


async def test_a_chat_tasks_stored_template_serves_chat_with_the_prompt_it_trained_on(make_api, loaded):
    # What a chat job stores with its prefix (`training.job_run`): the template of its sources.
    api = await make_api()
    prefix = torch.randn(loaded.spec.num_layers, 2, loaded.spec.num_heads, 4, loaded.spec.head_dim,
                         generator=torch.Generator().manual_seed(0)) * 3  # fmt: skip
    training = {"chat_template": chat_template("<|endoftext|>")}
    data = dump_artifact(new_artifact({"decoder": prefix}, loaded.spec, task="chatty", training=training))
    assert (await api.upload("chatty", data)).status_code == 201
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    common = {"model": "chatty", "max_tokens": 6, "temperature": 0}
    chat = await api.client.post("/v1/chat/completions", json={**common, "messages": messages}, headers=ACME)
    prompt = render_chat(messages) + "<|endoftext|>"
    completion = await api.client.post("/v1/completions", json={**common, "prompt": prompt}, headers=ACME)
    assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
    assert chat.json()["usage"]["prompt_tokens"] == completion.json()["usage"]["prompt_tokens"]
    assert chat.json()["choices"][0]["message"]["content"] == completion.json()["choices"][0]["text"]


async def test_a_job_store_that_is_down_is_a_503_within_the_store_deadline(make_api):
    from tests.api.conftest import DEAD_REDIS_URL

    api = await make_api(redis=True, redis_url=DEAD_REDIS_URL, store_timeout_s=1.0)
    started = time.monotonic()
    for response in (
        await api.client.get("/v1/fine_tuning/jobs", headers=ACME),
        await upload(api, colors_file()),
    ):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and openai_error(response)["type"] == "unavailable"
    assert time.monotonic() - started < 10
    files = api.settings.fine_tuning_data_dir() / "files"
    assert not files.exists() or not any(files.rglob("file-*"))  # the refused upload left no bytes

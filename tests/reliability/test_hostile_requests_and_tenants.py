"""Against one real server process: hostile requests get a 4xx while others keep being served, tenants
are isolated end to end (keys, listing, generation, uploads, deletes, rollback, metrics labels), and a
keys file without keys stops the server from starting."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import artifact_bytes
from tests.reliability.conftest import (
    ACME,
    ACME_GEN,
    GLOBEX,
    REPO_ROOT,
    ServerProcess,
    generate,
    upload,
)

pytestmark = pytest.mark.timeout(300)
PUBLIC_TASK = "public-task"  # the only task on the metrics allow-list


@pytest.fixture(scope="module")
def server(long_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        long_gpt2_dir,
        tmp_path_factory.mktemp("server"),
        max_body_bytes=256 * 1024,
        metrics_task_labels=PUBLIC_TASK,
    )
    proc.start()
    yield proc
    proc.stop()


def test_hostile_requests_are_4xx_and_others_keep_being_served(server):
    with server.client(timeout=120) as client:
        expected = generate(client, None, max_new_tokens=300).json()["generated_text"]
        # A normal request runs the whole time the hostile ones arrive.
        result: dict[str, httpx.Response] = {}
        normal = threading.Thread(
            target=lambda: result.update(r=generate(server.client(timeout=120), None, max_new_tokens=300))
        )
        normal.start()
        h = {**ACME, "content-type": "application/json"}
        cases: dict[str, tuple[bytes, dict[str, str]]] = {
            "prompt over the positions": (
                json.dumps({"inputs": "hello " * 5000, "parameters": {"max_new_tokens": 4}}).encode(),
                h,
            ),
            "max_new_tokens past the positions": (
                json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}).encode(),
                h,
            ),
            "max_new_tokens past the schema bound": (
                json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 10**12}}).encode(),
                h,
            ),
            "negative temperature": (b'{"inputs": "hi", "parameters": {"temperature": -1}}', h),
            "top_p > 1": (b'{"inputs": "hi", "parameters": {"top_p": 1.5, "do_sample": true}}', h),
            "negative top_k": (b'{"inputs": "hi", "parameters": {"top_k": -3}}', h),
            "zero repetition_penalty": (b'{"inputs": "hi", "parameters": {"repetition_penalty": 0}}', h),
            "NaN temperature": (b'{"inputs": "hi", "parameters": {"temperature": NaN}}', h),
            "negative seed": (b'{"inputs": "hi", "parameters": {"seed": -1}}', h),
            "too many stop sequences": (
                json.dumps({"inputs": "hi", "parameters": {"stop": ["x"] * 100}}).encode(),
                h,
            ),
            "malformed JSON": (b'{"inputs": "hi",', h),
            "JSON array": (b'["hi"]', h),
            "deeply nested JSON": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", h),
            "unknown field": (b'{"inputs": "hi", "beam_width": 4}', h),
            "unknown parameter": (b'{"inputs": "hi", "parameters": {"guidance": 1}}', h),
            "non-UTF-8 body": (b'{"inputs": "\xff\xfe\xfd"}', h),
            "not JSON at all": (b"\x00\x01\x02binary", h),
            "body over the limit": (b'{"inputs": "' + b"a" * 300_000 + b'"}', h),
        }
        for name, (body, headers) in cases.items():
            r = client.post("/v1/generate", content=body, headers=headers)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
            assert set(r.json()) == {"error", "error_type"}, (name, r.text[:300])
            assert "Traceback" not in r.text
        completions = [
            {"model": "base", "prompt": [10**9]},  # token id outside the vocabulary
            {"model": "base", "prompt": "hi", "max_tokens": -1},
            {"model": "base", "prompt": "hi", "temperature": 3},
            {"model": "base", "prompt": ["a", "b"]},
            {"model": "../../etc", "prompt": "hi"},
        ]
        for body in completions:
            r = client.post("/v1/completions", json=body, headers=ACME)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
        # Not even HTTP: garbage on the socket must not hurt the server.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
            raw.recv(1024)
        normal.join(timeout=120)
        assert result["r"].status_code == 200 and result["r"].json()["generated_text"] == expected
        assert generate(client, None, max_new_tokens=300).json()["generated_text"] == expected
        assert client.get("/ready").status_code == 200


def test_tenant_isolation_end_to_end(server, long_spec):
    spec = long_spec
    with server.client(timeout=120) as client:
        # Keys: none, unknown, malformed, and a generate-only key trying to manage.
        for headers in [
            {},
            {"Authorization": "Bearer not-a-configured-key"},
            {"Authorization": "acme-manage-key"},
        ]:
            assert generate(client, None, headers).status_code == 401
            assert client.get("/v1/prefixes", headers=headers).status_code == 401
        assert upload(client, "secret", artifact_bytes(spec, 1), ACME_GEN).status_code == 403

        assert upload(client, "secret", artifact_bytes(spec, 1)).status_code == 201
        assert upload(client, "secret", artifact_bytes(spec, 2)).status_code == 201
        assert upload(client, PUBLIC_TASK, artifact_bytes(spec, 3)).status_code == 201
        acme_secret = client.get("/v1/prefixes/secret", headers=ACME).json()
        acme_text = generate(client, "secret").json()["generated_text"]

        # Globex sees none of it, and every attempt to touch it is "not found" (existence never leaks).
        assert client.get("/v1/prefixes", headers=GLOBEX).json()["items"] == []
        assert [m["id"] for m in client.get("/v1/models", headers=GLOBEX).json()["data"]][1:] == []
        attempts = [
            ("GET", "/v1/prefixes/secret", {}),
            ("DELETE", "/v1/prefixes/secret", {}),
            ("POST", "/v1/prefixes/secret/rollback", {"json": {"version": 1}}),
            ("POST", "/v1/generate", {"json": {"task": "secret", "inputs": "x"}}),
            ("POST", "/generate", {"json": {"inputs": "x", "parameters": {"adapter_id": "secret"}}}),
            ("POST", "/v1/generate_stream", {"json": {"task": "secret", "inputs": "x"}}),
            ("POST", "/v1/completions", {"json": {"model": "secret", "prompt": "x"}}),
        ]
        for method, url, kwargs in attempts:
            r = client.request(method, url, headers=GLOBEX, **kwargs)
            missing = client.request(method, url.replace("secret", "never-existed"), headers=GLOBEX, **kwargs)
            assert r.status_code == missing.status_code == 404, (method, url, r.text)
        # Globex's own task of the same name, its upload, rollback and delete leave Acme's alone.
        assert upload(client, "secret", artifact_bytes(spec, 7), GLOBEX).json()["version"] == 1
        assert upload(client, "secret", artifact_bytes(spec, 8), GLOBEX).json()["version"] == 2
        assert (
            client.post("/v1/prefixes/secret/rollback", json={"version": 1}, headers=GLOBEX).status_code
            == 200
        )
        assert generate(client, "secret", GLOBEX).json()["generated_text"] != acme_text
        assert client.delete("/v1/prefixes/secret", headers=GLOBEX).status_code == 204
        assert client.get("/v1/prefixes/secret", headers=ACME).json() == acme_secret
        assert generate(client, "secret").json()["generated_text"] == acme_text

        # Metrics: /metrics needs no key, so raw task names must stay inside the bounded set.
        generate(client, PUBLIC_TASK)
        running = threading.Thread(
            target=lambda: generate(server.client(timeout=120), "secret", ACME, max_new_tokens=1500)
        )
        running.start()
        try:
            scrapes = [client.get("/metrics").text for _ in range(20)]
        finally:
            running.join(timeout=120)
        text = "\n".join(scrapes)
        assert f'task="{PUBLIC_TASK}"' in text and 'task="other"' in text
        assert "secret" not in text, [line for line in text.splitlines() if "secret" in line][:3]
        assert set(re.findall(r'[{,]tenant="([^"]*)"', text)) <= {"acme", "globex", "other"}
        for listed in re.findall(r'(?:running|waiting)_tasks="([^"]*)"', text):
            assert set(filter(None, listed.split(","))) <= {f"acme/{PUBLIC_TASK}", "acme/other"}, listed


def test_api_keys_file_without_keys_refuses_to_start(tmp_path, tiny_gpt2_dir):
    for name, content in [
        ("empty-object", "{}"),
        ("empty-file", ""),
        ("invalid", "{not json"),
        ("null", "null"),
    ]:
        keys_file = tmp_path / f"{name}.json"
        keys_file.write_text(content)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
        env.update(
            PREFIXSERVE_MODEL=str(tiny_gpt2_dir),
            PREFIXSERVE_PORT="0",
            PREFIXSERVE_API_KEYS_FILE=str(keys_file),
            PREFIXSERVE_LOCAL_STORE_DIR=str(tmp_path / "store"),
        )
        done = subprocess.run(
            [sys.executable, "-m", "server.main"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode != 0, (name, output[-2000:])
        assert "PREFIXSERVE_API_KEYS_FILE" in output, (name, output[-2000:])
        assert "Uvicorn running" not in output
    missing = tmp_path / "does-not-exist.json"
    done = subprocess.run(
        [sys.executable, "-m", "server.main"],
        cwd=REPO_ROOT,
        env={**env, "PREFIXSERVE_API_KEYS_FILE": str(missing)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode != 0 and "does-not-exist.json" in (done.stdout + done.stderr).decode()


def test_empty_api_keys_value_refuses_to_start(tmp_path, tiny_gpt2_dir):
    # PREFIXSERVE_API_KEYS set but empty (an unset Secret key rendered as ""): fail closed, never
    # run without authentication.
    for value in ["", "   "]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
        env.update(
            PREFIXSERVE_MODEL=str(tiny_gpt2_dir),
            PREFIXSERVE_PORT="0",
            PREFIXSERVE_API_KEYS=value,
            PREFIXSERVE_LOCAL_STORE_DIR=str(tmp_path / "store"),
        )
        done = subprocess.run(
            [sys.executable, "-m", "server.main"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 2, (repr(value), output[-2000:])
        assert "PREFIXSERVE_API_KEYS" in output and "holds no API keys" in output, output[-2000:]
        assert "Uvicorn running" not in output

"""`prefixserve prefixes ...` end to end against a running server, through the real entry point.

The server limits uploads to one per 5 s per tenant (`PREFIXSERVE_TENANT_UPLOAD_RPS=0.2`), so a burst
of uploads meets 429 + Retry-After: the CLI must wait and retry until each upload is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.models import load_model
from prefix_store.artifact import load_artifact
from prefix_store.peft_format import artifact_to_peft
from prefixserve.cli import main as prefixserve
from tests.api.conftest import KEYS, artifact_bytes
from training.upload import UploadError, resolve_api_key, retry_after_seconds


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = prefixserve(["prefixes", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prefixes_commands_against_a_server_with_429_retries(
    spawn_server, tiny_gpt2_dir, tmp_path, monkeypatch, capsys
):
    server = spawn_server(tenant_upload_rps=0.2)
    spec = load_model(str(tiny_gpt2_dir), device="cpu").spec
    artifact = tmp_path / "sql.safetensors"
    artifact.write_bytes(artifact_bytes(spec, 1))
    peft_dir = tmp_path / "peft-adapter"
    peft_dir.mkdir()
    config, model = artifact_to_peft(load_artifact(artifact_bytes(spec, 2), spec), spec)
    (peft_dir / "adapter_config.json").write_bytes(config)
    (peft_dir / "adapter_model.safetensors").write_bytes(model)
    key_file = tmp_path / "acme.key"
    key_file.write_text("acme-manage-key\n")
    monkeypatch.delenv("PREFIXSERVE_API_KEY", raising=False)
    monkeypatch.setenv("PREFIXSERVE_SERVER", server.url)
    acme = ("--api-key-file", str(key_file), "-o", "json")

    # A burst of three uploads: at most one fits each 5 s window, so the CLI gets 429s and retries.
    versions, retried = [], ""
    for _ in range(3):
        code, out, err = run(capsys, "upload", "sql", str(artifact), *acme)
        assert code == 0, err
        versions.append(json.loads(out)["version"])
        retried += err
    assert versions == [1, 2, 3]
    assert "HTTP 429; retrying" in retried

    code, out, err = run(capsys, "upload", "imported", str(peft_dir), *acme)
    assert code == 0, err
    assert json.loads(out)["source"] == "peft"

    code, out, _ = run(capsys, "list", *acme)
    assert [(p["task"], p["version"]) for p in json.loads(out)] == [("imported", 1), ("sql", 3)]
    code, out, _ = run(capsys, "list", "--api-key-file", str(key_file))  # the table for people
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["TASK", "VERSION"] and lines[2].split()[:2] == ["sql", "3"]

    code, out, _ = run(capsys, "rollback", "sql", "1", *acme)
    assert code == 0 and json.loads(out)["version"] == 1
    code, out, _ = run(capsys, "show", "sql", *acme)
    shown = json.loads(out)
    assert shown["current_version"] == 1 and [v["version"] for v in shown["versions"]] == [1, 2, 3]

    code, _, _ = run(capsys, "delete", "imported", *acme)
    assert code == 0
    code, _, err = run(capsys, "show", "imported", *acme)
    assert code == 1 and "HTTP 404" in err

    # The key from the environment; another tenant sees none of Acme's prefixes.
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "globex-manage-key")
    code, out, _ = run(capsys, "list", "-o", "json")
    assert code == 0 and json.loads(out) == []
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "not-a-key-at-all")
    code, _, err = run(capsys, "list")
    assert code == 1 and "HTTP 401" in err
    assert "globex-manage-key" in KEYS  # the keys the server was started with


def test_upload_command_takes_the_key_from_a_file_and_never_from_the_command_line(
    spawn_server, tiny_gpt2_dir, tmp_path, monkeypatch, capsys
):
    server = spawn_server()
    spec = load_model(str(tiny_gpt2_dir), device="cpu").spec
    artifact = tmp_path / "a.safetensors"
    artifact.write_bytes(artifact_bytes(spec, 3))
    key_file = tmp_path / "key"
    key_file.write_text("acme-manage-key")
    monkeypatch.delenv("PREFIXSERVE_API_KEY", raising=False)
    args = ["upload", "--server", server.url, "--task", "t", "--artifact", str(artifact)]
    assert prefixserve([*args, "--api-key-file", str(key_file)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    with pytest.raises(SystemExit):  # argparse: no such option
        prefixserve([*args, "--api-key", "acme-manage-key"])
    monkeypatch.setenv("PREFIXSERVE_API_KEY_FILE", str(key_file))
    assert prefixserve(args) == 0


def test_api_key_resolution(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key({"PREFIXSERVE_API_KEY": "from-env"}, key_file) == "from-env"
    assert resolve_api_key({}, key_file) == "from-file"
    assert resolve_api_key({"PREFIXSERVE_API_KEY_FILE": str(key_file)}) == "from-file"
    assert resolve_api_key({}) is None
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UploadError, match="API key file"):
            resolve_api_key({}, bad)


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None

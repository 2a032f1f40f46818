"""Served output equals `prefixserve eval`'s greedy output: the replication's prefix through a real server.

Starts `python -m server.main` (a subprocess: training never imports the server) on a free port with
the replication's LM, a local prefix store in a temp dir and one "manage" key; uploads the artifact;
then for each source sends `" " + source + "<|endoftext|>"` (the paper-form prompt, as text that
tokenises back to exactly eval's prompt ids) with greedy decoding and eval's `max_new_tokens`, and
compares the text with eval's. Any difference raises `ServeMismatch`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from training.upload import upload_artifact

KEY = "replicate-serve-check-key"
REPO = Path(__file__).resolve().parents[2]


class ServeMismatch(AssertionError):
    """The server generated something else than `prefixserve eval` for the same prefix and input."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_served_equals_eval(
    model_dir: Path, artifact: Path, task: str, eval_outputs: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, Any]:
    """Compare every `{"source", "generated"}` of a greedy eval with the server's answer."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PREFIXSERVE_MODEL": str(model_dir),
            "PREFIXSERVE_PORT": str(port),
            "PREFIXSERVE_LOCAL_STORE_DIR": str(Path(tmp) / "store"),
            "PREFIXSERVE_DEVICE": "cpu",
            "PREFIXSERVE_API_KEYS": json.dumps({KEY: {"tenant": "default", "role": "manage"}}),
        }
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "server.main"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_ready(url, proc, log_path)
                upload_artifact(url, task, artifact, KEY)
                mismatches = []
                for out in eval_outputs:
                    response = httpx.post(
                        f"{url}/v1/generate",
                        headers={"Authorization": f"Bearer {KEY}"},
                        json={
                            "task": task,
                            "inputs": " " + out["source"] + "<|endoftext|>",
                            "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False},
                        },
                        timeout=120,
                    )
                    if response.status_code != 200:
                        raise ServeMismatch(f"server answered {response.status_code}: {response.text}")
                    served = response.json()["generated_text"].strip()
                    if served != out["generated"]:
                        mismatches.append(
                            {"source": out["source"], "eval": out["generated"], "served": served}
                        )
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if mismatches:
        raise ServeMismatch(f"{len(mismatches)} of {len(eval_outputs)} differ; first: {mismatches[0]}")
    return {"compared": len(eval_outputs), "equal": len(eval_outputs)}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 300  # a loaded shared machine can take minutes to import torch
    while True:
        if proc.poll() is not None:
            raise ServeMismatch(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServeMismatch(f"server not ready in 300 s:\n{log_path.read_text()}")
        time.sleep(0.5)

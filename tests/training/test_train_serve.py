"""Train -> export -> upload to the real server -> generate over HTTP gives the training module's output.

Starts `python -m server.main` as a subprocess on a free port with the tiny model, a local store in a
tmp dir and one "manage" API key; uploads with `training.upload`; generates greedily for exactly as many
tokens as the training module's own greedy output, and compares the text.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modeling.models import load_model
from tests.training.conftest import COLORS_TRAIN, EOS, MIN_MARGIN, SYNTHETIC, target_margins, train_colors
from training.data import Truncation, causal_prompt
from training.export import export
from training.upload import upload_artifact

KEY = "train-serve-key-0123"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tiny_gpt2_dir: Path, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "PREFIXSERVE_MODEL": str(tiny_gpt2_dir),
        "PREFIXSERVE_PORT": str(port),
        "PREFIXSERVE_LOCAL_STORE_DIR": str(tmp_path / "store"),
        "PREFIXSERVE_DEVICE": "cpu",
        "PREFIXSERVE_API_KEYS": json.dumps({KEY: {"tenant": "default", "role": "manage"}}),
    }
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.main"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in 90 s:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_uploaded_prefix_generates_the_training_modules_output(
    tiny_gpt2_dir: Path, tmp_path: Path, server: str
) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    run = train_colors(loaded, tmp_path / "run")
    # The training module learned the task by a clear margin (see conftest.COLORS_TRAIN), so its own
    # greedy answers are the targets on any CPU; the served answers must equal them token for token.
    assert float(target_margins(run.tuner, run.rows).min()) > MIN_MARGIN
    artifact_path = export(run.tuner, tmp_path / "run", "colors", {"steps": COLORS_TRAIN.max_steps})[
        "artifact"
    ]
    upload_artifact(server, "colors", artifact_path, KEY)
    for source, target in SYNTHETIC:
        prompt_ids = causal_prompt(loaded.tokenizer, source, EOS, Truncation())
        expected_ids = run.tuner.greedy(prompt_ids, 8)
        expected = loaded.tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert expected.strip() == target
        response = httpx.post(
            f"{server}/v1/generate",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "task": "colors",
                # The prompt as text: `source<|endoftext|>` tokenises back to exactly prompt_ids.
                "inputs": loaded.tokenizer.decode(prompt_ids),
                "parameters": {"max_new_tokens": len(expected_ids), "do_sample": False},
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == expected

"""Train -> export -> upload to the real server -> generate over HTTP gives the training module's output.

Starts `python -m server.main` as a subprocess on a free port with the tiny model, a local store in a
tmp dir and one "manage" API key; uploads with `training.upload`; generates greedily for exactly as many
tokens as the training module's own greedy output, and compares the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.process import ServerProcess
from modeling.models import load_model
from tests.training.conftest import COLORS_TRAIN, EOS, MIN_MARGIN, SYNTHETIC, target_margins, train_colors
from training.data import Truncation, causal_prompt
from training.export import export
from training.upload import upload_artifact

KEY = "train-serve-key-0123"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0  # importing torch + transformers on a loaded 2-core machine took over 90 s


@pytest.fixture
def server(tiny_gpt2_dir: Path, tmp_path: Path) -> Iterator[str]:
    settings = {
        "model": str(tiny_gpt2_dir),
        "local_store_dir": str(tmp_path / "store"),
        "device": "cpu",
        "api_keys": {KEY: {"tenant": "default", "role": "manage"}},
    }
    proc = ServerProcess(settings, tmp_path / "server.log", cwd=REPO).start()
    try:
        proc.wait_ready(START_TIMEOUT_S)
        yield proc.url
    finally:
        proc.stop(timeout_s=20)


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

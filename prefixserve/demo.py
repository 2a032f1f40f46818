"""`make demo`: the main job end to end on the embedded default, with no model hub and no Redis.

1. writes a small random-weight GPT-2 model directory (real GPT-2 tokenizer) if missing;
2. trains prefixes for two demo tasks with the training module (a few seconds each on a toy task, so
   each task visibly steers the same frozen model its own way);
3. starts the server (`python -m server.main`) on a free loopback port with the local directory store;
4. uploads both prefixes with `POST /v1/prefixes`, sends `POST /v1/generate` for both tasks and for the
   bare model, concurrently so they share batches, and prints the answers;
5. stops the server (SIGTERM, graceful drain) and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import httpx

from loadtest.process import ServerProcess
from modeling.models import load_model, make_model_dir
from prefix_store.artifact import dump_artifact

DEMO_DIR = Path(os.environ.get("PREFIXSERVE_DEMO_DIR", "demo-data"))
# Two toy tasks: same inputs, different targets. After training, each prefix makes the frozen model
# answer in its task's way.
TASKS = {
    "fruit": [("red", " a ripe apple"), ("yellow", " a sweet banana"), ("green", " a sour lime")],
    "nature": [("red", " the evening sunset"), ("yellow", " the midday sun"), ("green", " the quiet forest")],
}


def _make_prefixes(model_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Train one small prefix per demo task with the training module (a few seconds each on CPU)."""
    import torch

    from training.data import Example, Truncation, encode_causal
    from training.export import build_artifact
    from training.prefix import PrefixConfig, make_tuner
    from training.trainer import TrainConfig, train

    paths = {}
    loaded = load_model(str(model_dir), device="cpu", trainable=False)
    eos = int(loaded.tokenizer.eos_token_id)
    for task, pairs in TASKS.items():
        path = out_dir / f"{task}.safetensors"
        if not path.exists():
            print(f"[demo] training a prefix for task {task!r} (a few seconds) ...", flush=True)
            rows = encode_causal(loaded.tokenizer, [Example(s, t) for s, t in pairs], eos, eos, Truncation())
            torch.manual_seed(0)
            tuner = make_tuner(loaded, PrefixConfig(prefix_length=8, mlp_hidden=128))
            cfg = TrainConfig(lr=1e-2, batch_size=len(rows), max_steps=300, warmup_steps=10, progress=False)
            train(tuner, rows, None, cfg, out_dir / f"{task}-run", eos)
            artifact = build_artifact(tuner, task, {"demo": True, "steps": cfg.max_steps})
            path.write_bytes(dump_artifact(artifact))
        paths[task] = path
    return paths


async def _generate(
    client: httpx.AsyncClient, task: str | None, text: str
) -> tuple[str | None, str, str, dict]:
    # The training format is `source <|endoftext|> target`: the separator asks for the target.
    body: dict[str, object] = {
        "inputs": text + "<|endoftext|>",
        "parameters": {"max_new_tokens": 12, "details": True},
    }
    if task:
        body["task"] = task
    r = await client.post("/v1/generate", json=body)
    r.raise_for_status()
    data = r.json()
    return task, text, data["generated_text"], data.get("details") or {}


async def _talk_to_server(base_url: str, prefixes: dict[str, Path]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for task, path in prefixes.items():
            r = await client.post(
                "/v1/prefixes", data={"task": task}, files={"artifact": (path.name, path.read_bytes())}
            )
            r.raise_for_status()
            info = r.json()
            print(f"[demo] uploaded {task!r}: version {info['version']}, {info['num_parameters']} parameters")
        # All six requests are in flight together: rows for both tasks and the bare model share batches.
        calls = [_generate(client, task, word) for word in ("red", "green") for task in (*prefixes, None)]
        for answered_task, word, text, details in await asyncio.gather(*calls):
            label = answered_task or "(base model)"
            print(f"[demo] {label:>12} | {word!r:>7} -> {text!r}  (finish: {details.get('finish_reason')})")


def main() -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = DEMO_DIR / "model"
    if not (model_dir / "config.json").exists():
        print("[demo] writing a random-weight GPT-2 model (real GPT-2 tokenizer) ...", flush=True)
        # A small GPT-2 with a wide weight init: at GPT-2's 0.02 a 64-wide random model's logits are
        # nearly flat, and no prefix could visibly steer it.
        make_model_dir("tiny-gpt2", model_dir, seed=0, initializer_range=0.5)
    prefixes = _make_prefixes(model_dir, DEMO_DIR)
    server = ServerProcess(
        {
            "model": str(model_dir),
            "local_store_dir": tempfile.mkdtemp(prefix="prefixserve-demo-store-"),
            "log_format": "text",
            "log_level": "WARNING",
        },  # no PREFIXSERVE_REDIS_URL: the embedded default, a local store
        DEMO_DIR / "server.log",
    )
    print(f"[demo] starting the server on {server.url} (log: {server.log_path}) ...", flush=True)
    try:
        server.start().wait_ready(timeout_s=120)
        asyncio.run(_talk_to_server(server.url, prefixes))
    except (RuntimeError, TimeoutError) as exc:  # start-up failed (the message holds the log's tail)
        print(f"[demo] {exc}", file=sys.stderr)
        return 1
    finally:
        code = server.stop(timeout_s=60)
    print(f"[demo] server stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

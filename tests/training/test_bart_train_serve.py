"""A BART prefix trained by the training module (the paper's three prefixes) is served by the engine,
batched with other requests, and gives exactly the training module's own greedy outputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from modeling.models import load_model
from prefix_store.artifact import dump_artifact
from prefix_store.local_store import LocalPrefixStore
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.limits import Limits
from tests.training.conftest import SYNTHETIC
from training.data import Example, Truncation, encode_seq2seq, seq2seq_source
from training.export import build_artifact
from training.prefix import PrefixConfig, make_tuner
from training.trainer import TrainConfig, train


async def test_trained_bart_prefix_serves_the_training_modules_outputs(
    tiny_bart_dir: Path, tmp_path: Path
) -> None:
    loaded = load_model(str(tiny_bart_dir), device="cpu")
    c = loaded.model.config
    examples = [Example(s, t) for s, t in SYNTHETIC]
    rows = encode_seq2seq(
        loaded.tokenizer, examples, c.bos_token_id, c.eos_token_id, c.decoder_start_token_id, Truncation()
    )
    torch.manual_seed(0)
    tuner = make_tuner(loaded, PrefixConfig(prefix_length=6, mlp_hidden=128, placement="paper"))
    cfg = TrainConfig(lr=1e-2, batch_size=6, max_steps=150, warmup_steps=10, progress=False)
    train(tuner, rows, None, cfg, tmp_path / "run", c.pad_token_id)
    tuner.eval()
    sources = [
        seq2seq_source(loaded.tokenizer, s, c.bos_token_id, c.eos_token_id, Truncation())
        for s, _ in SYNTHETIC
    ]
    # The training module's own generation is the reference (whether it is exactly the target after a
    # fixed budget is decided by float rounding, so that is not asserted; test_bart.py checks the loss).
    expected = [tuner.greedy(src, 8) for src in sources]

    artifact = build_artifact(tuner, "colors", {"steps": 150})
    assert set(artifact.prefixes) == {"encoder", "decoder", "cross"}
    store = LocalPrefixStore(tmp_path / "store")
    await store.start()
    await store.put("default", "colors", dump_artifact(artifact), {})
    engine = Engine(loaded, store, EngineConfig(Limits(max_batch_size=4)))
    await engine.start()
    try:

        async def serve(i: int, source: list[int], task: str | None) -> list[int]:
            await asyncio.sleep(0.005 * i)  # staggered: rows join a running batch
            request = GenerationRequest(
                request_id=f"r{i}",
                prompt=source[1:-1],  # the runner adds <s> ... </s> itself
                params=SamplingParams(max_new_tokens=8),
                task=task,
            )
            return [event.token_id async for event in engine.generate(request)]

        # The trained task's requests share batches with bare-model requests.
        calls = [serve(i, src, "colors") for i, src in enumerate(sources)]
        calls += [serve(len(sources) + i, src, None) for i, src in enumerate(sources[:2])]
        served = await asyncio.gather(*calls)
    finally:
        await engine.stop(drain_timeout_s=0)
        await store.close()
    assert served[: len(sources)] == expected
    assert served[len(sources)] != expected[0]  # the prefix is what makes the difference

"""The outside BART baselines, bare (no prefixes: neither has any): `ctranslate2_fp32` and
`ctranslate2_int8` (CTranslate2's `translate_batch`, the BART server a CPU user would pick) and
`hf_generate` (HF `generate`).

Both serve static batches: when the model is free it takes up to `max_batch_size` waiting requests in
arrival order, whatever their tasks, and the batch decodes greedily the longest `max_new_tokens` of its
members, EOS impossible until then (every runner's exact output lengths). A request's output is its own
requested tokens and its end is its own last token (as if streamed), as in `static_batch`.

CTranslate2 runs a copy of the model directory converted by its own converter (written once beside
it, `<model dir>-ct2-<compute type>`), with as many threads as torch uses; token times come from its
per-token callback (greedy search calls it for every token of every batch member).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loadtest.machine import PeakMemory
from loadtest.metrics import RequestRecord, RunResult
from loadtest.runners.common import RunClock, StepTimer
from loadtest.workload import ClientPool, RequestSpec, Workload
from modeling.bart_prefix import wrap_source
from modeling.models import LoadedModel

BART_BASELINES = ("ctranslate2_fp32", "ctranslate2_int8", "hf_generate")
_CT2_COMPUTE_TYPES = {"ctranslate2_fp32": "float32", "ctranslate2_int8": "int8"}

# (wrapped sources [B][S], new tokens) -> when each member's tokens were ready [B][new tokens]
Decode = Callable[[list[list[int]], int], list[list[float]]]


def run_bart_baseline(
    name: str, loaded: LoadedModel, model_dir: Path, workload: Workload, max_batch_size: int
) -> RunResult:
    """Serve `workload` with the baseline `name` (one of `BART_BASELINES`)."""
    if not loaded.spec.is_encoder_decoder:
        raise ValueError(f"{name} is a BART baseline; this model is {loaded.spec.model_type}")
    clock = RunClock()
    decode = (
        _ct2_decode(name, loaded, model_dir, clock)
        if name in _CT2_COMPUTE_TYPES
        else _hf_decode(loaded, clock)
    )
    config = loaded.model.config
    decode([wrap_source([100] * 8, config)], 2)  # warm-up: first-call allocations and thread start
    with PeakMemory(loaded.device) as mem:
        clock.t0 = time.perf_counter()
        records, batches, computed = _serve_static(workload, max_batch_size, decode, clock, config)
        wall = clock.now()
    return RunResult(
        name,
        records,
        wall,
        mem.peak_rss_bytes,
        mem.peak_device_bytes,
        computed_tokens=computed,
        extra={"num_batches": batches, "max_batch_size": max_batch_size},
    )


def _serve_static(
    workload: Workload, max_batch_size: int, decode: Decode, clock: RunClock, config: object
) -> tuple[list[RequestRecord], int, int]:
    """(records, batches, tokens computed: padded sources and every member's decoded tokens)."""
    pool = ClientPool(workload)
    queue: deque[RequestSpec] = deque()
    records: list[RequestRecord] = []
    batches = computed = 0
    while True:
        queue.extend(pool.arrived(clock.now()))
        if not queue:
            nxt = pool.next_arrival()
            if nxt is None:
                return records, batches, computed
            time.sleep(max(0.0, nxt - clock.now()))
            continue
        members = [queue.popleft() for _ in range(min(max_batch_size, len(queue)))]
        times = decode(
            [wrap_source(r.prompt_ids, config) for r in members], max(r.max_new_tokens for r in members)
        )
        batches += 1
        for req, member_times in zip(members, times, strict=True):
            own = member_times[: req.max_new_tokens]
            records.append(
                RequestRecord.of(
                    req,
                    None,
                    pool.arrival_s[req.request_id],
                    token_times=own,
                    end=own[-1],
                    finish_reason="length",
                )
            )
            pool.finish(own[-1])


def _hf_decode(loaded: LoadedModel, clock: RunClock) -> Decode:
    model, device = loaded.model, loaded.device
    pad = int(model.config.pad_token_id)

    @torch.inference_mode()
    def decode(sources: list[list[int]], num_new: int) -> list[list[float]]:
        width = max(len(s) for s in sources)
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sources], device=device)  # [B, S]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sources], device=device)  # [B, S]
        timer = StepTimer(clock)
        model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            num_beams=1,
            streamer=timer,
        )
        return [list(timer.times) for _ in sources]

    return decode


def ct2_model_dir(model_dir: Path, compute_type: str) -> Path:
    """The CTranslate2 conversion of `model_dir` (written once); int8 weights for `int8`."""
    import ctranslate2

    out = model_dir.parent / f"{model_dir.name}-ct2-{compute_type}"
    if (out / "model.bin").exists():
        return out
    # Converted from a copy of the directory fixed for CTranslate2 4.8.5: its BART loader reads
    # `config.normalize_before`, which transformers 5 no longer writes (False: BART is post-norm), and
    # wants one vocabulary entry per embedding row (our bundled tokenizer has 3 fewer: unused fillers).
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / model_dir.name
        source.mkdir()
        for item in model_dir.glob("*.safetensors"):
            (source / item.name).symlink_to(item.resolve())
        config = json.loads((model_dir / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({"normalize_before": False, **config}))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.add_tokens([f"<ct2-filler-{i}>" for i in range(int(config["vocab_size"]) - len(tokenizer))])
        tokenizer.save_pretrained(str(source))
        quantization = None if compute_type == "float32" else compute_type
        ctranslate2.converters.TransformersConverter(str(source)).convert(
            str(out), quantization=quantization, force=True
        )
    return out


def _ct2_decode(name: str, loaded: LoadedModel, model_dir: Path, clock: RunClock) -> Decode:
    import ctranslate2

    compute_type = _CT2_COMPUTE_TYPES[name]
    path = ct2_model_dir(model_dir, compute_type)
    translator = ctranslate2.Translator(
        str(path),
        device="cpu",
        compute_type=compute_type,
        inter_threads=1,
        intra_threads=torch.get_num_threads(),
    )
    vocabulary = json.loads((path / "shared_vocabulary.json").read_text())  # id -> token string

    def decode(sources: list[list[int]], num_new: int) -> list[list[float]]:
        times: list[list[float]] = [[] for _ in sources]

        def on_token(step: ctranslate2.GenerationStepResult) -> bool:
            times[step.batch_id].append(clock.now())
            return False  # go on

        translator.translate_batch(
            [[vocabulary[i] for i in s] for s in sources],
            beam_size=1,
            max_input_length=0,  # no truncation
            max_decoding_length=num_new,
            min_decoding_length=num_new,
            callback=on_token,
        )
        return times

    return decode

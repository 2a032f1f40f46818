"""GPU checks of the BART runner (marker `gpu`; skipped cleanly without CUDA).

The same scenario as the CPU test of shared prefixes (`tests/engine/bart_scenario.py`: mixed tasks with
all three prefix kinds, a task whose version changes while its old rows decode, rows joining beside
decoding rows) on CUDA: fp32 greedy tokens equal the CPU run's and logits are within 1e-4; bf16 starts
like fp32 (first tokens equal where fp32's choice is not a near-tie). Never run on a GPU yet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling.models import load_model, make_model_dir
from server.engine.bart_runner import BartRunner
from tests.engine.bart_scenario import Run, run_bart_scenario, scenario_artifacts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # init_std 0.2: greedy output depends on the source and the prefixes (as in tests/engine/test_bart.py)
    return make_model_dir("tiny-bart", tmp_path_factory.mktemp("bart") / "model", init_std=0.2)


def _run(model_dir: Path, device: str, dtype: str) -> Run:
    loaded = load_model(str(model_dir), device=device, dtype=dtype)
    artifacts = scenario_artifacts(loaded.spec, loaded.device, loaded.dtype)
    return run_bart_scenario(BartRunner(loaded, max_rows=8, block_size=4), artifacts)


def test_fp32_cuda_equals_cpu(bart_dir: Path) -> None:
    cuda, cpu = _run(bart_dir, "cuda", "float32"), _run(bart_dir, "cpu", "float32")
    assert cuda.tokens == cpu.tokens
    for rid, rows in cpu.logits.items():
        diff = (torch.stack(cuda.logits[rid]) - torch.stack(rows)).abs().max().item()
        assert diff < 1e-4, (rid, diff)


def test_bf16_starts_like_fp32(bart_dir: Path) -> None:
    bf16, fp32 = _run(bart_dir, "cuda", "bfloat16"), _run(bart_dir, "cuda", "float32")
    clear = []  # rows whose first fp32 choice leads the runner-up by a margin bf16 cannot close
    for rid, rows in fp32.logits.items():
        top = rows[0].topk(2).values
        if (top[0] - top[1]).item() > 0.1:  # bf16 moves these logits by ~1e-2
            clear.append(rid)
    assert len(clear) >= len(fp32.logits) // 2, "too many near-ties: the check says nothing"
    assert {r: bf16.tokens[r][0] for r in clear} == {r: fp32.tokens[r][0] for r in clear}

"""`make replicate`: the miniature replication end to end, and its report (docs/replication.md).

1. Pretrain a BPE tokenizer and a small GPT-2 on the LM corpus (`splits.lm_corpus`).
2. Task splits by MR; the frozen LM with no prefix is evaluated as it is.
3. Full data: prefix-tuning through `prefixserve train` and full fine-tuning through the same loop
   (`finetune.FullModelTuner`), same rows, batch, steps and schedule; each picks its learning rate from
   a two-point grid by dev loss and exports its best-dev state.
4. Low data: `--low-n` pairs, several seeds, both methods, the learning rates chosen in 3.
5. `prefixserve eval` on the held-out MRs: greedy for every run, beam 5 (the paper's) for the
   full-data ones; BLEU and slot coverage.
6. The full-data prefix through a running server: served output must equal eval's greedy output.
7. The report: table, plot, command, machine, wall time, and what the numbers say.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.cli import eval_main, train_main
from training.replicate import splits
from training.replicate.lm import LMConfig, pretrain
from training.replicate.report import write_report

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "replicate" / "data" / "e2e"


@dataclass(frozen=True)
class Plan:
    """The experiment's sizes (defaults: `make replicate`; `--quick`: a smoke run of a few minutes)."""

    # Sized for well under an hour on one core. The first plan ran in 4 min on an idle core and trained
    # for 300 steps, under one epoch: too short to tell "prefix-tuning is worse" from "not trained".
    lm: LMConfig = LMConfig(n_layer=4, n_embd=128, block=128, steps=1500, warmup_steps=100)
    num_dev_mrs: int = 20
    num_test_mrs: int = 80
    full_steps: int = 1200  # ~3 epochs of the 3,943 training pairs at batch 10
    low_n: int = 100
    low_steps: int = 200  # 20 epochs of the 100 pairs
    low_seeds: tuple[int, ...] = (1, 2, 3)
    # Each grid brackets the best rate of an earlier run (3e-3 and 1e-3, each then at its grid's edge).
    prefix_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    finetune_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    prefix_length: int = 10  # the paper's table-to-text setting
    mlp_hidden: int = 512  # the paper's k for table-to-text
    batch_size: int = 10
    max_new_tokens: int = 48
    serve_check_sources: int = 10


QUICK = Plan(
    lm=LMConfig(steps=40, warmup_steps=5),
    num_dev_mrs=5,
    num_test_mrs=8,
    full_steps=20,
    low_n=20,
    low_steps=10,
    low_seeds=(1, 2),
    prefix_lrs=(5e-3,),
    finetune_lrs=(1e-3,),
    max_new_tokens=20,
    serve_check_sources=3,
)


def prefix_run(
    lm_dir: Path, train: Path, dev: Path, out: Path, lr: float, steps: int, seed: int, p: Plan
) -> dict:
    argv = [
        "--model", str(lm_dir), "--data", str(train), "--format", "e2e", "--dev", str(dev), "--task", "e2e",
        "--out", str(out), "--prefix-length", str(p.prefix_length), "--mlp-hidden", str(p.mlp_hidden),
        "--lr", str(lr), "--batch-size", str(p.batch_size), "--max-steps", str(steps),
        "--eval-every", str(max(steps // 4, 1)), "--seed", str(seed), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    if train_main(argv) != 0:
        raise RuntimeError(f"prefixserve train failed: {argv}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "command": "prefixserve train " + " ".join(argv),
        "summary": summary,
        "artifact": out / "artifact.safetensors",
    }


def finetune_run(
    lm_dir: Path, train: Path, dev: Path, out: Path, lr: float, steps: int, seed: int, p: Plan
) -> dict:
    from modeling.models import load_model
    from training.cli import build_rows
    from training.data import Truncation, load_examples
    from training.replicate.finetune import FullModelTuner
    from training.trainer import TrainConfig, evaluate_loss
    from training.trainer import train as train_loop

    loaded = load_model(str(lm_dir), device="cpu", dtype="float32")
    tuner = FullModelTuner(loaded)
    rows = build_rows(loaded, load_examples(train, "e2e"), Truncation())
    dev_rows = build_rows(loaded, load_examples(dev, "e2e"), Truncation())
    pad = int(loaded.tokenizer.pad_token_id)
    cfg = TrainConfig(
        lr=lr,
        batch_size=p.batch_size,
        max_steps=steps,
        seed=seed,
        eval_every=max(steps // 4, 1),
        progress=False,
    )
    initial = evaluate_loss(tuner, dev_rows, p.batch_size, pad)
    result = train_loop(tuner, rows, dev_rows, cfg, out, pad)
    model_dir = tuner.save(out / "model")
    state = result.state
    summary = {
        "steps": state.step,
        "best_dev_loss": state.best_dev_loss,
        "initial_dev_loss": initial,
        "exported_step": result.exported_step,
        "train_seconds": state.train_seconds,
        "num_trainable_parameters": sum(p.numel() for p in tuner.parameters() if p.requires_grad),
        "loop": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {
        "command": f"training.replicate.finetune lr={lr} steps={steps} seed={seed}",
        "summary": summary,
        "model": model_dir,
    }


def evaluate_run(model: Path, artifact: Path | None, test: Path, out: Path, beams: int, p: Plan) -> dict:
    argv = [
        "--model", str(model), "--data", str(test), "--format", "e2e", "--out", str(out),
        "--num-beams", str(beams), "--max-new-tokens", str(p.max_new_tokens), "--device", "cpu",
    ]  # fmt: skip
    if artifact is not None:
        argv += ["--artifact", str(artifact)]
    if beams == 1:
        argv += ["--no-ban-newlines"]  # greedy exactly as the server decodes (serve check)
    if eval_main(argv) != 0:
        raise RuntimeError(f"prefixserve eval failed: {argv}")
    result = json.loads(out.read_text())
    coverage = [
        splits.slot_coverage(mr, o["generated"])
        for mr, o in zip(_test_mrs(test), result["outputs"], strict=True)
    ]
    return {
        "command": "prefixserve eval " + " ".join(argv),
        "bleu": result["metrics"]["bleu"],
        "rougeL": result["metrics"]["rougeL"],
        "slot_coverage": 100.0 * statistics.mean(coverage),
        "outputs": result["outputs"],
    }


def _test_mrs(test: Path) -> list[str]:
    """Distinct MRs of the test CSV in first-seen order (eval's grouping order)."""
    return list(dict.fromkeys(r["mr"] for r in splits.read_rows(test)))


def best_by_dev(runs: dict[float, dict]) -> float:
    return min(runs, key=lambda lr: runs[lr]["summary"]["best_dev_loss"])


def run(out: Path, plan: Plan, report: Path | None, plot: Path | None, command: str) -> dict[str, Any]:
    started = time.time()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        print(f"[replicate] {name}: {timings[name]} s (total {time.time() - started:.0f} s)", flush=True)

    t0 = time.time()
    corpus = splits.lm_corpus(splits.read_rows(DATA / "devset.csv"), seed=0)
    lm_dir = out / "lm"
    lm_stats = pretrain(corpus, lm_dir, plan.lm)
    lap("pretrain", t0)

    t0 = time.time()
    task = splits.task_splits(
        splits.read_rows(DATA / "testset_w_refs.csv"), plan.num_dev_mrs, plan.num_test_mrs, seed=0
    )
    files = {name: splits.write_rows(out / "data" / f"{name}.csv", rows) for name, rows in task.items()}
    results: dict[str, Any] = {"frozen": {}}
    results["frozen"]["greedy"] = evaluate_run(
        lm_dir, None, files["test"], out / "eval" / "frozen-greedy.json", 1, plan
    )
    results["frozen"]["beam"] = evaluate_run(
        lm_dir, None, files["test"], out / "eval" / "frozen-beam.json", 5, plan
    )
    lap("frozen eval", t0)

    t0 = time.time()
    prefix_grid = {
        lr: prefix_run(
            lm_dir,
            files["train"],
            files["dev"],
            out / "prefix" / f"full-lr{lr}",
            lr,
            plan.full_steps,
            0,
            plan,
        )
        for lr in plan.prefix_lrs
    }
    lap("prefix full data", t0)
    t0 = time.time()
    ft_grid = {
        lr: finetune_run(
            lm_dir,
            files["train"],
            files["dev"],
            out / "finetune" / f"full-lr{lr}",
            lr,
            plan.full_steps,
            0,
            plan,
        )
        for lr in plan.finetune_lrs
    }
    lap("finetune full data", t0)
    prefix_lr, ft_lr = best_by_dev(prefix_grid), best_by_dev(ft_grid)
    t0 = time.time()
    prefix_full, ft_full = prefix_grid[prefix_lr], ft_grid[ft_lr]
    for name, model, artifact in (
        ("prefix", lm_dir, prefix_full["artifact"]),
        ("finetune", ft_full["model"], None),
    ):
        results[name] = {
            "greedy": evaluate_run(
                model, artifact, files["test"], out / "eval" / f"{name}-greedy.json", 1, plan
            ),
            "beam": evaluate_run(model, artifact, files["test"], out / "eval" / f"{name}-beam.json", 5, plan),
        }
    lap("full data eval", t0)

    t0 = time.time()
    low: dict[str, list[dict]] = {"prefix": [], "finetune": []}
    for seed in plan.low_seeds:
        low_file = splits.write_rows(
            out / "data" / f"low{plan.low_n}-seed{seed}.csv", splits.low_data(task["train"], plan.low_n, seed)
        )
        pr = prefix_run(
            lm_dir,
            low_file,
            files["dev"],
            out / "prefix" / f"low-seed{seed}",
            prefix_lr,
            plan.low_steps,
            seed,
            plan,
        )
        ft = finetune_run(
            lm_dir,
            low_file,
            files["dev"],
            out / "finetune" / f"low-seed{seed}",
            ft_lr,
            plan.low_steps,
            seed,
            plan,
        )
        low["prefix"].append(
            evaluate_run(
                lm_dir, pr["artifact"], files["test"], out / "eval" / f"prefix-low-seed{seed}.json", 1, plan
            )
            | {"train_seconds": pr["summary"]["train_seconds"]}
        )
        low["finetune"].append(
            evaluate_run(
                ft["model"], None, files["test"], out / "eval" / f"finetune-low-seed{seed}.json", 1, plan
            )
            | {"train_seconds": ft["summary"]["train_seconds"]}
        )
    lap("low data", t0)

    t0 = time.time()
    from training.replicate.serve_check import check_served_equals_eval

    greedy_outputs = results["prefix"]["greedy"]["outputs"][: plan.serve_check_sources]
    serve = check_served_equals_eval(
        lm_dir, prefix_full["artifact"], "e2e", greedy_outputs, plan.max_new_tokens
    )
    lap("serve check", t0)

    summary = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_seconds": round(time.time() - started, 1),
        "timings": timings,
        "plan": asdict(plan),
        "lm": lm_stats,
        "splits": {
            name: {"rows": len(rows), "mrs": len({r["mr"] for r in rows})} for name, rows in task.items()
        },
        "lr": {"prefix": prefix_lr, "finetune": ft_lr},
        "grid": {
            "prefix": {str(lr): r["summary"]["best_dev_loss"] for lr, r in prefix_grid.items()},
            "finetune": {str(lr): r["summary"]["best_dev_loss"] for lr, r in ft_grid.items()},
        },
        "params": {
            "model": lm_stats["parameters"],
            "prefix_trained": prefix_full["summary"]["num_trainable_parameters"],
            "prefix_stored": plan.prefix_length * plan.lm.n_layer * 2 * plan.lm.n_embd,
            "finetune_trained": ft_full["summary"]["num_trainable_parameters"],
        },
        "train_seconds": {
            "prefix": prefix_full["summary"]["train_seconds"],
            "finetune": ft_full["summary"]["train_seconds"],
        },
        "results": {
            k: {m: {x: v[m][x] for x in ("bleu", "rougeL", "slot_coverage")} for m in v}
            for k, v in results.items()
        },
        "low": {
            k: [{x: r[x] for x in ("bleu", "rougeL", "slot_coverage", "train_seconds")} for r in v]
            for k, v in low.items()
        },
        "samples": [
            {"source": o["source"], **{k: results[k]["greedy"]["outputs"][i]["generated"] for k in results}}
            for i, o in enumerate(results["prefix"]["greedy"]["outputs"][:3])
        ],
        "serve_check": serve,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if report is not None:
        write_report(summary, report, plot)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.replicate.run", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/replicate", help="working directory (models, runs, evals)")
    p.add_argument("--report", default="docs/replication.md", help="report to write ('' = none)")
    p.add_argument("--plot", default="docs/replication.png", help="plot to write ('' = none)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (not the experiment)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared 2-core machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m training.replicate.run " + " ".join(argv if argv is not None else sys.argv[1:])
    run(
        Path(args.out),
        QUICK if args.quick else Plan(),
        Path(args.report) if args.report else None,
        Path(args.plot) if args.plot else None,
        command,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`prefixserve` — one entry point, one subcommand per job.

Each subcommand hands the rest of the command line to its owner's `main(argv)`, which has its own
parser, so `prefixserve <command> --help` shows that command's options. Imports are lazy: `prefixserve
make-model` does not load FastAPI, `prefixserve serve` does not load the training stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# command -> one-line help
COMMANDS: dict[str, str] = {
    "serve": "run the inference server (settings from PREFIXSERVE_* env vars)",
    "make-model": "write a random-weight model directory (gpt2, bart-base, ...)",
    "train": "train a prefix for a task and export its artifact",
    "eval": "generate on a dev/test file and score BLEU/ROUGE",
    "upload": "upload an artifact to a running server",
    "prefixes": "manage a server's prefixes: list, show, upload, delete, rollback",
    "jobs": "a server's fine-tuning jobs: list, show, events, cancel",
    "train-worker": "train queued fine-tuning jobs (a worker process; settings as serve)",
    "import-peft": "convert a PEFT prefix-tuning adapter to an artifact",
    "bench": "run the benchmark harness (profiles: quick, default, gpu)",
}


def owner_main(command: str) -> Callable[[list[str]], int | None]:
    """The `main(argv)` that owns `command`, its package imported only now (`make-model` loads no
    FastAPI). Real imports, not module-name strings, so the import contracts see that this CLI, the
    top layer, uses server, training and loadtest (and nothing uses it)."""
    if command == "serve":
        from server.main import main as serve_main

        return serve_main
    if command in ("train", "eval", "upload"):
        from training import cli as training_cli

        return {
            "train": training_cli.train_main,
            "eval": training_cli.eval_main,
            "upload": training_cli.upload_main,
        }[command]
    if command == "prefixes":
        from prefixserve.admin import main as admin_main

        return admin_main
    if command == "jobs":
        from prefixserve.jobs import main as jobs_main

        return jobs_main
    if command == "train-worker":
        from prefixserve.train_worker import main as worker_main

        return worker_main
    if command == "bench":
        from loadtest.bench import main as bench_main

        return bench_main
    return {"make-model": make_model_main, "import-peft": import_peft_main}[command]


def make_model_main(argv: list[str] | None = None) -> int:
    from modeling.models import PRESETS, make_model_dir

    parser = argparse.ArgumentParser(
        prog="prefixserve make-model",
        description="Write a HF-format model directory with random weights and the bundled GPT-2 tokenizer. "
        "The gpt2/gpt2-medium/bart-base/bart-large presets have exactly the real checkpoints' shapes.",
    )
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same weights")
    args = parser.parse_args(argv)
    out = make_model_dir(args.preset, args.out_dir, seed=args.seed)
    print(f"wrote {args.preset} (seed {args.seed}) to {out}")
    return 0


def import_peft_main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from modeling.models import load_model
    from prefix_store.artifact import dump_artifact
    from prefix_store.peft_format import peft_to_artifact

    parser = argparse.ArgumentParser(
        prog="prefixserve import-peft",
        description="Convert a PEFT prefix-tuning adapter (save_pretrained folder) into a prefixserve artifact.",
    )
    parser.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument(
        "--model", required=True, help="the base model (HF id or local dir) it was trained on"
    )
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", required=True, help="artifact path to write (.safetensors)")
    args = parser.parse_args(argv)
    folder = Path(args.adapter_dir)
    loaded = load_model(args.model, device="cpu")
    artifact = peft_to_artifact(
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
        loaded.spec,
        task=args.task,
    )
    Path(args.out).write_bytes(dump_artifact(artifact))
    print(f"wrote {args.out}: prefix lengths {artifact.prefix_lengths}, {artifact.num_parameters} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="prefixserve",
        description="Multi-tenant inference server for prefix-tuned GPT-2 and BART.",
        epilog="Run `prefixserve <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    result = owner_main(command)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`prefixserve train | eval | upload`: argument parsing at the edge, plain config objects below.

Each `*_main(argv)` parses its own arguments (`--help` lists them with the paper's defaults) and
returns a process exit code. The top-level `prefixserve` CLI dispatches to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from training.data import (
    FORMATS,
    Truncation,
    default_truncation,
    encode_causal,
    encode_seq2seq,
    group_references,
    load_examples,
    prepend_source,
)

SUMMARY_NAME = "summary.json"


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixserve train",
        description="Train a prefix for one task on a frozen GPT-2 or BART and export its artifact "
        "(OUT/artifact.safetensors, OUT/peft/ for GPT-2, OUT/summary.json, OUT/checkpoints/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="base model: local HF directory or HF id in the local cache"
    )
    p.add_argument("--data", required=True, help="training file")
    p.add_argument("--format", required=True, choices=FORMATS, help="format of --data and --dev")
    p.add_argument("--task", required=True, help="task name recorded in the artifact (and used for upload)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dev", help="dev file: dev loss each epoch, early stopping, export of the best state")
    p.add_argument(
        "--prefix-length",
        type=int,
        help="prefix length L (default 10, the paper's; E2E best 5; --init paper: the text's token count)",
    )
    p.add_argument(
        "--mlp-hidden", type=int, default=512, help="MLP hidden size k (paper: 512; 800 for summarisation)"
    )
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (paper: 5e-5; E2E best 8e-5)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (paper: 10; E2E best 5)")
    p.add_argument("--batch-size", type=int, default=5, help="micro-batch size (paper: 5; E2E best 10)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps of the linear schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--init-text", help='initialise from the activations of real words, e.g. "table-to-text:"')
    p.add_argument(
        "--init",
        choices=["random", "text-fit", "paper"],
        help="prefix init (default: text-fit with --init-text, else random). paper = the paper's code: "
        "L = the text's token count, only the MLP fitted from a random P' (500 steps, lr 1e-4), the text "
        "prepended to every source (eval does the same from the artifact). text-fit = ours: text repeated "
        "or cut to L, P' and MLP fitted (300 steps, lr 1e-3)",
    )
    p.add_argument("--init-steps", type=int, help="Adam steps of the init fit (default: the --init's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prefix init and the batch order")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--resume", help="checkpoint dir, or a previous --out dir (its latest checkpoint)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on CUDA)")
    p.add_argument(
        "--placement",
        default="paper",
        choices=["paper", "peft"],
        help="BART only: paper = encoder+decoder+cross prefixes; peft = decoder self-attention only",
    )
    p.add_argument(
        "--max-source-tokens",
        type=int,
        help="sources keep their first N tokens (default: xsum 1024, else 512)",
    )
    p.add_argument(
        "--max-target-tokens", type=int, help="targets keep their first N tokens (default: xsum 60, else 128)"
    )
    _add_plain_format(p)
    p.add_argument("--patience", type=int, help="dev evaluations without improvement before stopping")
    p.add_argument(
        "--select-on",
        choices=["loss", "bleu"],
        default="loss",
        help="best dev state by dev loss, or by dev BLEU (greedy generation on --dev's sources; the paper's)",
    )
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="CUDA autocast dtype (fp16 uses a GradScaler); CPU always trains in fp32",
    )
    p.add_argument(
        "--eval-every", type=int, help="optimizer steps between dev evaluations (default: each epoch)"
    )
    p.add_argument(
        "--checkpoint-every", type=int, help="optimizer steps between checkpoints (default: each epoch)"
    )
    p.add_argument("--limit", type=int, help="train on the first N examples only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _add_plain_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plain-format",
        action="store_true",
        help="the plain data form instead of the paper's: E2E MRs verbatim, triples with underscores as "
        "spaces and relations as written, no leading space before a GPT-2 source, no <s> in BART targets",
    )


def truncation_for(args: argparse.Namespace) -> Truncation:
    """The format's default truncation with the flags that were given."""
    default = default_truncation(args.format)
    return Truncation(
        args.max_source_tokens or default.max_source_tokens,
        getattr(args, "max_target_tokens", None) or default.max_target_tokens,
    )


def build_rows(
    loaded: Any, examples: list[Any], trunc: Truncation, paper: bool = True
) -> list[dict[str, list[int]]]:
    """Tokenised training rows for the model's architecture (see training.data); `paper`: the paper's
    form (leading space before a GPT-2 source, `<s>` opening a BART target)."""
    tok = loaded.tokenizer
    if loaded.spec.is_encoder_decoder:
        c = loaded.model.config
        return encode_seq2seq(
            tok,
            examples,
            c.bos_token_id,
            c.eos_token_id,
            c.decoder_start_token_id,
            trunc,
            bos_in_target=paper,
        )
    return encode_causal(tok, examples, tok.eos_token_id, tok.eos_token_id, trunc, leading_space=paper)


def dev_bleu_fn(loaded: Any, dev_examples: list[Any], trunc: Truncation, paper: bool) -> Any:
    """Dev BLEU of the live prefix: greedy generation on the dev sources, as `prefixserve eval` does."""
    import torch

    from training.evaluate import EvalConfig, generate_texts, score

    items = group_references(dev_examples)
    cfg = EvalConfig(max_source_tokens=trunc.max_source_tokens, leading_space=paper)

    def dev_bleu(tuner: Any) -> float:
        with torch.no_grad():
            prefixes = {k: v.detach() for k, v in tuner.prefixes().items()}
        hyps = generate_texts(loaded, prefixes, [it.source for it in items], cfg)
        return float(score(hyps, [it.references for it in items])["bleu"])

    return dev_bleu


def train_main(argv: list[str] | None = None) -> int:
    """Train, export and summarise; returns 0 on success."""
    args = _train_parser().parse_args(argv)
    # Heavy imports here so `--help` stays fast.
    from modeling.models import load_model
    from training.export import export, training_metadata
    from training.prefix import PrefixConfig, make_tuner
    from training.trainer import TrainConfig, evaluate_loss, resolve_checkpoint, train

    started = time.time()
    trunc = truncation_for(args)
    paper = not args.plain_format
    init = args.init or ("text-fit" if args.init_text else "random")
    if init != "random" and not args.init_text:
        raise SystemExit(f"--init {init} needs --init-text")
    prepend = args.init_text if init == "paper" else None
    train_examples = prepend_source(load_examples(args.data, args.format, paper)[: args.limit], prepend)
    dev_examples = prepend_source(load_examples(args.dev, args.format, paper), prepend) if args.dev else []
    from training.distributed import init_from_launcher, rank_world, shutdown

    # Under `torchrun`, join its process group (the launcher's environment is read here, at the edge).
    device = init_from_launcher(os.environ, args.device)
    loaded = load_model(args.model, device=device, dtype="float32")
    prefix_length = args.prefix_length or 10
    if init == "paper":
        from training.prefix import text_token_ids

        prefix_length = len(text_token_ids(loaded.tokenizer, args.init_text))
        if args.prefix_length not in (None, prefix_length):
            raise SystemExit(
                f"--init paper: L is the init text's token count ({prefix_length}), not --prefix-length"
            )
    prefix_cfg = PrefixConfig(
        prefix_length=prefix_length,
        mlp_hidden=args.mlp_hidden,
        init_text=args.init_text if init != "random" else None,
        init_steps=args.init_steps,
        placement=args.placement,
        init=init if init != "random" else "text-fit",
    )
    loop_cfg = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        patience=args.patience,
        progress=not args.no_progress,
        precision=args.precision,
        select_on=args.select_on,
    )
    import torch

    torch.manual_seed(args.seed)  # the prefix MLPs' random init
    # A resume loads the trained prefix from its checkpoint: no --init-text fit, no initial dev loss
    # of fresh weights; both come from the interrupted run's summary when it wrote one.
    previous: dict[str, Any] = {}
    if args.resume:
        previous_summary = resolve_checkpoint(args.resume).parent.parent / SUMMARY_NAME
        previous = json.loads(previous_summary.read_text()) if previous_summary.is_file() else {}
    tuner = make_tuner(loaded, replace(prefix_cfg, init_text=None) if args.resume else prefix_cfg)
    train_rows = build_rows(loaded, train_examples, trunc, paper)
    dev_rows = build_rows(loaded, dev_examples, trunc, paper) if dev_examples else None
    pad_id = int(loaded.tokenizer.pad_token_id)
    if args.resume:
        initial_dev, init_report = previous.get("initial_dev_loss"), previous.get("init_fit_relative_error")
    else:
        initial_dev = evaluate_loss(tuner, dev_rows, args.batch_size, pad_id) if dev_rows else None
        init_report = tuner.init_report
    dev_bleu = (
        dev_bleu_fn(loaded, dev_examples, trunc, paper) if args.select_on == "bleu" and dev_rows else None
    )
    result = train(
        tuner, train_rows, dev_rows, loop_cfg, args.out, pad_id, resume=args.resume, dev_bleu=dev_bleu
    )
    state = result.state
    training_meta = training_metadata(
        asdict(prefix_cfg) | {"kinds": list(tuner.kinds), "init": init, "source_prepend": prepend},
        loop_cfg,
        trunc,
        {
            "train": str(args.data),
            "dev": args.dev,
            "format": args.format,
            "source_form": "paper" if paper else "plain",
            "num_train": len(train_rows),
        },
        args.model,
        result,
    ) | {"world_size": rank_world()[1]}
    if rank_world()[0] != 0:  # data-parallel: every rank holds the same prefix; rank 0 writes it
        shutdown()
        return 0
    written = export(tuner, args.out, args.task, training_meta)
    summary = {
        "task": args.task,
        **training_meta,
        "init_fit_relative_error": init_report,
        "initial_dev_loss": initial_dev,
        "num_trainable_parameters": sum(p.numel() for p in tuner.parameters() if p.requires_grad),
        "tokens": state.num_tokens,
        "tokens_per_second": state.num_tokens / max(state.train_seconds, 1e-9),
        "train_losses": state.train_losses,
        "dev_losses": state.dev_losses,
        "dev_bleus": state.dev_bleus,
        "wall_seconds": round(time.time() - started, 3),
        "files": written,
    }
    Path(args.out, SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    print(
        json.dumps({k: summary[k] for k in ("task", "steps", "final_train_loss", "best_dev_loss", "files")})
    )
    shutdown()
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixserve eval",
        description="Generate with an exported prefix on a dev/test file and score BLEU and ROUGE-1/2/L.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model the artifact was trained on")
    p.add_argument("--artifact", help="artifact.safetensors (omit to evaluate the bare model)")
    p.add_argument("--data", required=True, help="evaluation file (references grouped per source)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument(
        "--num-beams", type=int, help="1 = greedy; default: the paper's (5 e2e/webnlg/dart, 6 xsum, else 1)"
    )
    p.add_argument(
        "--length-penalty", type=float, help="beam length penalty; default: the paper's (xsum 0.8, else 1)"
    )
    p.add_argument("--min-new-tokens", type=int, default=0, help="eos is not allowed before this many tokens")
    p.add_argument(
        "--ban-newlines",
        action=argparse.BooleanOptionalAction,
        help="never generate newline tokens; default: the paper's (on for e2e/webnlg/dart)",
    )
    p.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="beam search stops once num-beams hypotheses ended (HF early_stopping=True); "
        "--no-early-stopping is HF's default heuristic (the paper's code)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate only the first N distinct sources")
    p.add_argument("--batch-size", type=int, default=16, help="greedy decoding batch size")
    p.add_argument("--max-source-tokens", type=int, help="same truncation as training (xsum 1024, else 512)")
    p.add_argument(
        "--official-metrics",
        action="store_true",
        help="also E2E's official NIST, METEOR, ROUGE-L (COCO) and CIDEr (pycocoevalcap; needs java)",
    )
    _add_plain_format(p)
    p.add_argument("--device", default="auto")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """Evaluate and write the results JSON; returns 0 on success."""
    args = _eval_parser().parse_args(argv)
    from modeling.models import load_model
    from prefix_store.artifact import load_artifact
    from training.evaluate import EvalConfig, evaluate, paper_decoding

    loaded = load_model(args.model, device=args.device, dtype="float32")
    artifact = load_artifact(Path(args.artifact).read_bytes(), loaded.spec) if args.artifact else None
    # The paper's init prepends its text to every source: the artifact says so, eval does the same.
    prepend = (artifact.metadata.training.get("prefix") or {}).get("source_prepend") if artifact else None
    items = group_references(
        prepend_source(load_examples(args.data, args.format, not args.plain_format), prepend)
    )
    paper = paper_decoding(args.format)
    cfg = EvalConfig(
        num_beams=paper["num_beams"] if args.num_beams is None else args.num_beams,
        length_penalty=paper["length_penalty"] if args.length_penalty is None else args.length_penalty,
        min_new_tokens=args.min_new_tokens,
        ban_newlines=paper["ban_newlines"] if args.ban_newlines is None else args.ban_newlines,
        early_stopping=args.early_stopping,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        max_source_tokens=truncation_for(args).max_source_tokens,
        leading_space=not args.plain_format,
        official_metrics=args.official_metrics,
    )
    result = evaluate(loaded, artifact, items, cfg, args.out)
    print(json.dumps(result["metrics"]))
    return 0


def _upload_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixserve upload",
        allow_abbrev=False,  # `--api-key SECRET` must be refused, not taken for `--api-key-file`
        description="Upload an artifact to a running server (POST /v1/prefixes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--server", default="http://localhost:8000", help="server base URL")
    p.add_argument("--task", required=True, help="task name to publish under")
    p.add_argument("--artifact", required=True, help="artifact.safetensors, or a PEFT adapter folder")
    # Never the key itself on the command line (visible in `ps`): $PREFIXSERVE_API_KEY or a file.
    p.add_argument(
        "--api-key-file",
        help="file holding the API key (default: $PREFIXSERVE_API_KEY, $PREFIXSERVE_API_KEY_FILE)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt")
    p.add_argument("--retries", type=int, default=5, help="retries on 429/503 (honouring Retry-After)")
    return p


def upload_main(argv: list[str] | None = None) -> int:
    """Upload; prints the server's answer, or its error and returns 1."""
    args = _upload_parser().parse_args(argv)
    from training.upload import UploadError, resolve_api_key, upload_artifact

    try:
        key = resolve_api_key(os.environ, args.api_key_file)
        answer = upload_artifact(args.server, args.task, args.artifact, key, args.timeout, args.retries)
    except (UploadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0

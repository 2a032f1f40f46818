"""The training loop: AdamW, linear schedule with warmup, gradient accumulation, bf16 autocast on CUDA,
checkpoint/resume, early stopping on dev loss, progress bars, and a run summary.

Determinism: the batch order of epoch e is a permutation drawn from `seed + e`, the frozen model runs
without dropout, and a checkpoint records where in the epoch it was taken. Resuming from the
checkpoint of step s therefore replays exactly the batches and updates an uninterrupted run would
have made after step s (same loss curve, up to the nondeterminism of the device's kernels).

Checkpoints live in `OUT/checkpoints/step-NNNNNNNN/`: `trainable.safetensors` (the prefix parameters),
`optimizer.pt` and `scheduler.pt` (tensors and numbers only; loaded with `weights_only=True`) and
`state.json` (step, epoch, position in the epoch, loss history, early-stopping state). Resuming from
the checkpoint written when early stopping fired trains no further and returns the same result.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from training.data import collate
from training.distributed import all_reduce_grads, all_reduce_sum, rank_world
from training.prefix import PrefixTuner
from training.steplog import StepLog

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    """Loop hyper-parameters; defaults are the paper's (10 epochs, batch 5, lr 5e-5)."""

    lr: float = 5e-5
    epochs: int = 10
    batch_size: int = 5
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    seed: int = 0
    eval_every: int | None = None  # optimizer steps between dev evaluations; None = once per epoch
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None = once per epoch
    keep_checkpoints: int = 2
    patience: int | None = None  # dev evaluations without improvement before stopping; None = never
    progress: bool = True
    precision: str = "bf16"  # CUDA autocast: bf16 | fp16 (with a GradScaler) | fp32; CPU is always fp32
    select_on: str = "loss"  # best dev state by "loss" (lower) or "bleu" (higher; needs train(dev_bleu=...))


@dataclass
class TrainState:
    """Where the run is; what a checkpoint stores besides the tensors."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # next micro-batch of `epoch` to run
    train_losses: list[list[float]] = field(default_factory=list)  # [step, mean loss of the step]
    dev_losses: list[list[float]] = field(default_factory=list)  # [step, dev loss]
    best_dev_loss: float | None = None
    best_step: int | None = None
    dev_bleus: list[list[float]] = field(default_factory=list)  # [step, dev BLEU] (select_on="bleu")
    best_dev_bleu: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False  # patience ran out: a resume from here trains no further
    num_tokens: int = 0
    train_seconds: float = 0.0


class TrainingStopped(Exception):
    """`train`'s `on_step` asked it to stop before the end (a cancelled, paused or lost job)."""

    def __init__(self, state: TrainState, checkpoint: Path | None) -> None:
        super().__init__(f"training stopped at step {state.step}")
        self.state = state
        self.checkpoint = checkpoint  # the checkpoint of the step it stopped at, if it saved one


# `train`'s per-step hook: (state after the step, total steps, the checkpoint saved at this step or
# None) -> None to go on, "stop" to stop now, "checkpoint" to save a checkpoint (if none was) and stop.
StepHook = Callable[[TrainState, int, Path | None], str | None]


@dataclass
class TrainResult:
    state: TrainState
    stopped_early: bool
    exported_step: int
    total_steps: int


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_context(device: torch.device, precision: str = "bf16") -> Any:
    """Autocast on CUDA in `precision` (bf16 default, fp16, or fp32 = none); a no-op elsewhere (CPU
    runs in float32). Parameters and optimizer state stay float32 either way."""
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def make_scaler(device: torch.device, precision: str, force: bool = False) -> Any:
    """A GradScaler for fp16 on CUDA (fp16 gradients underflow without one); disabled otherwise.
    `force` enables it on any device (tests exercise its skip-and-back-off logic on CPU)."""
    enabled = force or (precision == "fp16" and device.type == "cuda")
    return torch.amp.GradScaler(device.type, enabled=enabled)


def optimizer_step(scaler: Any, optimizer: Any, params: Sequence[Tensor], max_grad_norm: float) -> bool:
    """Unscale, clip, step, update. Returns False when the scaler skipped the step (inf/nan grads:
    the parameters are unchanged and the scale backs off)."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return scale_before is None or scaler.get_scale() >= scale_before


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(
    tuner: PrefixTuner, rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int
) -> float:
    """Token-weighted mean target cross-entropy over `rows` (the model the loop trains, in eval mode)."""
    was_training = tuner.training
    tuner.eval()
    device = tuner.loaded.device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = _to(collate(rows[start : start + batch_size], pad_id), device)
        # GPT-2's loss shifts labels by one (the first label is never predicted); BART's does not.
        labels = batch["labels"] if "decoder_input_ids" in batch else batch["labels"][:, 1:]
        num = int((labels != -100).sum())
        with autocast_context(device):
            loss = tuner.loss(batch)
        total += float(loss) * num
        count += num
    tuner.train(was_training)
    return total / max(count, 1)


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation drawn from `seed + epoch`, cut in `batch_size`."""
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_rows, generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A `step-N.tmp` left by a crash mid-save is not one: it
    must never be resumed from, nor count towards `keep_checkpoints`."""
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.name[len("step-") :].isdigit())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the latest checkpoint under a run's output dir."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {p} (expected state.json or {CHECKPOINT_DIR}/step-*)")
    return found[-1]


def save_checkpoint(
    out_dir: Path,
    tuner: PrefixTuner,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    keep: int,
    best_state: dict[str, Tensor] | None = None,
) -> Path:
    ckpt = out_dir / CHECKPOINT_DIR / f"step-{state.step:08d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in tuner.trainable_state().items()}, tmp / "trainable.safetensors"
    )
    if best_state is not None:  # early stopping needs the best state after a resume too
        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, tmp / "best.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)  # a checkpoint dir is either complete or absent
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_checkpoint(
    ckpt: Path, tuner: PrefixTuner, optimizer: Any, scheduler: Any
) -> tuple[TrainState, dict[str, Tensor] | None]:
    """Restore the prefix, optimizer and scheduler from `ckpt`; returns (state, best dev state or None)."""
    device = tuner.loaded.device
    tuner.load_trainable_state(
        {k: v.to(device) for k, v in load_file(ckpt / "trainable.safetensors").items()}
    )
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    best = ckpt / "best.safetensors"
    best_state = {k: v.to(device) for k, v in load_file(best).items()} if best.is_file() else None
    return TrainState(**json.loads((ckpt / "state.json").read_text())), best_state


def train(
    tuner: PrefixTuner,
    train_rows: Sequence[dict[str, list[int]]],
    dev_rows: Sequence[dict[str, list[int]]] | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
    resume: str | Path | None = None,
    dev_bleu: Callable[[PrefixTuner], float] | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train `tuner`'s prefix on `train_rows`; with `dev_rows`, evaluate, early-stop and finish on the
    best dev state (the one that gets exported): lowest dev loss, or with `cfg.select_on == "bleu"`
    highest `dev_bleu(tuner)` (the paper selects on dev BLEU). Checkpoints go under `out_dir`.
    `on_step` is called after every optimizer step and may stop the run (`StepHook`): then
    `TrainingStopped` is raised."""
    if cfg.select_on == "bleu" and dev_bleu is None:
        raise ValueError('select_on="bleu" needs a dev_bleu function')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = tuner.loaded.device
    torch.manual_seed(cfg.seed)
    params = [p for p in tuner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rank, world = rank_world()
    micro_per_step = cfg.grad_accum * world  # data-parallel: each rank runs its share of the step
    micro_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / micro_per_step)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    state, best_state = TrainState(), None
    if resume is not None:
        state, best_state = load_checkpoint(resolve_checkpoint(resume), tuner, optimizer, scheduler)
    eval_every = cfg.eval_every or steps_per_epoch
    ckpt_every = cfg.checkpoint_every or steps_per_epoch
    stopped_early = state.stopped_early
    tuner.train()
    scaler = make_scaler(device, cfg.precision)
    log = StepLog(out) if rank == 0 else None
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not cfg.progress or rank != 0,
        desc="train",
        unit="step",
    )
    started = time.perf_counter()
    seconds_before, tokens_at_start = state.train_seconds, state.num_tokens
    while state.step < total_steps and not stopped_early:
        batches = epoch_batches(len(train_rows), cfg.batch_size, cfg.seed, state.epoch)
        while state.batch_in_epoch < len(batches) and state.step < total_steps:
            group = batches[state.batch_in_epoch : state.batch_in_epoch + micro_per_step]
            step_loss, step_tokens = 0.0, 0
            for idx in group[rank::world]:
                batch = _to(collate([train_rows[i] for i in idx], pad_id), device)
                with autocast_context(device, cfg.precision):
                    loss = tuner.loss(batch) / len(group)
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            all_reduce_grads(params)
            step_loss, tokens = all_reduce_sum([step_loss, step_tokens])
            state.num_tokens += int(tokens)
            lr = float(scheduler.get_last_lr()[0])
            optimizer_step(scaler, optimizer, params, cfg.max_grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += len(group)
            state.step += 1
            state.train_losses.append([state.step, step_loss])
            state.train_seconds = seconds_before + time.perf_counter() - started
            tok_s = (state.num_tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:.0f}", epoch=state.epoch)
            _write(
                log,
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": step_loss,
                    "lr": lr,
                    "tokens": state.num_tokens,
                    "seconds": round(state.train_seconds, 3),
                },
            )
            if dev_rows and state.step % eval_every == 0:
                stopped_early, best_state = _dev_eval(
                    tuner, dev_rows, cfg, pad_id, state, best_state, dev_bleu
                )
                _write(log, _dev_record(state))
            saved = None
            if rank == 0 and (state.step % ckpt_every == 0 or state.step == total_steps or stopped_early):
                saved = save_checkpoint(
                    out, tuner, optimizer, scheduler, state, cfg.keep_checkpoints, best_state
                )
            action = on_step(state, total_steps, saved) if on_step is not None else None
            if action == "checkpoint" and saved is None:
                saved = save_checkpoint(
                    out, tuner, optimizer, scheduler, state, cfg.keep_checkpoints, best_state
                )
            if action in ("stop", "checkpoint"):
                bar.close()
                if log is not None:
                    log.close()
                raise TrainingStopped(state, saved)
            if stopped_early:
                break
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    state.train_seconds = seconds_before + time.perf_counter() - started
    if dev_rows and (not state.dev_losses or state.dev_losses[-1][0] != state.step) and not stopped_early:
        stopped_early, best_state = _dev_eval(tuner, dev_rows, cfg, pad_id, state, best_state, dev_bleu)
        _write(log, _dev_record(state))
    if log is not None:
        log.close()
    exported_step = state.step
    if dev_rows and best_state is not None and state.best_step is not None and state.best_step != state.step:
        tuner.load_trainable_state(best_state)
        exported_step = state.best_step
    tuner.eval()
    return TrainResult(
        state=state, stopped_early=stopped_early, exported_step=exported_step, total_steps=total_steps
    )


def _write(log: StepLog | None, record: dict[str, Any]) -> None:
    if log is not None:  # rank 0 only
        log.write(record)


def _dev_record(state: TrainState) -> dict[str, float]:
    record = {"step": state.step, "dev_loss": state.dev_losses[-1][1]}
    if state.dev_bleus and state.dev_bleus[-1][0] == state.step:
        record["dev_bleu"] = state.dev_bleus[-1][1]
    return record


def _dev_eval(
    tuner: PrefixTuner,
    dev_rows: Sequence[dict[str, list[int]]],
    cfg: TrainConfig,
    pad_id: int,
    state: TrainState,
    best_state: dict[str, Tensor] | None,
    dev_bleu: Callable[[PrefixTuner], float] | None = None,
) -> tuple[bool, dict[str, Tensor] | None]:
    """One dev evaluation: record it, keep the best state (by loss or BLEU), say whether patience ran out."""
    dev_loss = evaluate_loss(tuner, dev_rows, cfg.batch_size, pad_id)
    state.dev_losses.append([state.step, dev_loss])
    if dev_bleu is not None:
        bleu = dev_bleu(tuner)
        state.dev_bleus.append([state.step, bleu])
        improved = cfg.select_on == "bleu" and (state.best_dev_bleu is None or bleu > state.best_dev_bleu)
    if cfg.select_on != "bleu":
        improved = state.best_dev_loss is None or dev_loss < state.best_dev_loss
    if improved:
        state.best_dev_loss, state.best_step = dev_loss, state.step
        if dev_bleu is not None:
            state.best_dev_bleu = state.dev_bleus[-1][1]
        state.evals_without_improvement = 0
        return False, tuner.trainable_state()
    state.evals_without_improvement += 1
    state.stopped_early = cfg.patience is not None and state.evals_without_improvement >= cfg.patience
    return state.stopped_early, best_state

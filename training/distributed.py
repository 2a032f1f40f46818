"""Data-parallel training across processes started by `torchrun` (gloo on CPU, nccl on CUDA).

Each optimizer step takes `grad_accum * world_size` micro-batches of the epoch's order; rank r runs
every world_size-th of them, losses are divided by the step's micro-batch count, and gradients are
summed across ranks with one all-reduce before the (identical) optimizer step on every rank. That is
DDP's arithmetic without its module wrapper (the tuner's `loss()` is not a `forward()`): N processes
with batch B compute what one process computes with batch B and `grad_accum * N`. Rank 0 alone
writes checkpoints, the log, the artifact and the summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_launcher(env: Mapping[str, str], device: str) -> str:
    """Join the process group `torchrun` describes in `env` (WORLD_SIZE > 1) and return this rank's
    device (cuda:LOCAL_RANK on CUDA); a single process is left alone."""
    if int(env.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(env.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def all_reduce_grads(params: Sequence[Tensor]) -> None:
    """Sum every parameter's gradient over ranks (a rank with no micro-batch this step adds zeros)."""
    if rank_world()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over ranks (step loss, tokens)."""
    if rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

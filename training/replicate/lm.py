"""A small byte-level BPE tokenizer and GPT-2, pretrained here as a plain language model.

The corpus is a list of lines (E2E references and, separately, MR lines: see `splits`). Lines are
joined as `line <|endoftext|> line <|endoftext|> ...`, packed into fixed blocks and trained with the
next-token loss: nothing tells the model which MR a reference belongs to.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, get_linear_schedule_with_warmup

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class LMConfig:
    """Tokenizer and model size, and the pretraining budget."""

    vocab_size: int = 1000
    n_layer: int = 3
    n_embd: int = 96
    n_head: int = 4
    n_positions: int = 256
    block: int = 64  # tokens per training sequence
    batch_size: int = 16
    steps: int = 500
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0


def train_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) with `<|endoftext|>` as id 0 (bos = eos = pad)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        clean_up_tokenization_spaces=False,  # decode exactly what was generated, as the server does
    )
    return fast


def pack(tokenizer: PreTrainedTokenizerFast, lines: list[str], block: int) -> torch.Tensor:
    """`[N, block]` token blocks of the corpus stream `line <eos> line <eos> ...`."""
    eos = int(tokenizer.eos_token_id)
    stream: list[int] = []
    for line in lines:
        stream.extend(tokenizer(" " + line, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block)  # [N, block]


def pretrain(lines: list[str], out_dir: Path, cfg: LMConfig) -> dict[str, float]:
    """Train the tokenizer and the LM on `lines`; save both to `out_dir` (a HF model directory).
    Returns the loss at the start and end, tokens seen and seconds."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = train_tokenizer(lines, cfg.vocab_size)
    eos = int(tokenizer.eos_token_id)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        resid_pdrop=0.0,  # no dropout anywhere: the frozen model in training is deterministic
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    blocks = pack(tokenizer, lines, cfg.block)  # [N, block]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = list(range(len(blocks)))
            rng.shuffle(order)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = blocks[idx]  # [B, block]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    head = sum(losses[:20]) / min(len(losses), 20)
    tail = sum(losses[-50:]) / min(len(losses), 50)
    return {
        "first_loss": head,
        "final_loss": tail,
        "final_perplexity": math.exp(tail),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.block,
        "corpus_tokens": int(blocks.numel()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }

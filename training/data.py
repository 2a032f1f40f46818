"""Datasets for prefix training: loaders for E2E, WebNLG, DART, XSum-style and generic JSONL files,
tokenisation into the two training formats, collation, and references grouped per source.

Every loader returns a list of `Example(source, target)`: one row per (source, reference) pair, so a
source with several references appears several times (that is how the paper trains on E2E). For
evaluation, `group_references` folds them back into one `EvalItem(source, references)` per distinct
source, in first-seen order.

Training formats (see docs/training.md for the truncation rules):

- decoder-only (GPT-2): `source <bos> target <eos>` with bos = eos = `<|endoftext|>` (the CLI tokenises
  `" " + source`, the paper's form: `leading_space`). Labels are -100 on
  the source, on the separator and on padding, so the loss covers the target tokens and the final eos
  only. Sources keep their *first* `max_source_tokens` tokens (the head of a table/article carries the
  most content); targets keep their first `max_target_tokens` tokens and always end with eos.
- encoder-decoder (BART): encoder input `[bos] source [eos]` (source truncated to `max_source_tokens`
  before wrapping), decoder input `[decoder_start] target` and labels `target [eos]`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.formats import Truncation as Truncation
from training.formats import default_truncation as default_truncation
from training.formats import e2e_source, triples_source

FORMATS = ("e2e", "webnlg", "dart", "xsum", "jsonl")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training pair: the source text (linearised table/triples/article) and one reference.
    `category`: WebNLG's entry category (what its seen/unseen split is made of), else None."""

    source: str
    target: str
    category: str | None = None


@dataclass(frozen=True)
class EvalItem:
    """One distinct source and all its references (E2E/WebNLG/DART have several per source)."""

    source: str
    references: list[str]
    category: str | None = None


# ----------------------------------------------------------------------------------------------- loaders


def load_e2e(path: str | Path, paper: bool = True) -> list[Example]:
    """E2E NLG CSV with columns `mr` (meaning representation) and `ref` (one reference per row).

    The source is the paper's `name : Alimentum | area : city centre` (`training.formats.e2e_source`),
    or the MR verbatim with `paper=False`.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: an E2E CSV needs columns 'mr' and 'ref', found {reader.fieldnames}")
        return [
            Example(e2e_source(row["mr"], paper), row["ref"].strip()) for row in reader if row["mr"].strip()
        ]


def _webnlg_triple(raw: Any) -> list[str]:
    # The 2017 release writes triples as {"subject", "property", "object"}; some re-releases as "s | p | o".
    if isinstance(raw, dict):
        return [str(raw["subject"]), str(raw["property"]), str(raw["object"])]
    if isinstance(raw, str):
        return [p.strip() for p in raw.split("|")]
    return [str(p) for p in raw]


def load_webnlg(path: str | Path, paper: bool = True) -> list[Example]:
    """WebNLG 2017 challenge JSON: `{"entries": [{"<id>": {"modifiedtripleset": [...],
    "lexicalisations": [{"lex": ..., "comment": ...}, ...]}}, ...]}` (a bare list of entries also works).

    Lexicalisations whose `comment` is not "good" (when a comment is given) are skipped, as in the
    paper's preprocessing. The entry's `category` is kept (seen/unseen scoring).
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    entries = data["entries"] if isinstance(data, dict) else data
    examples = []
    for wrapped in entries:
        # Each list item is {"<eid>": entry} in the release; accept a bare entry too.
        entry = next(iter(wrapped.values())) if len(wrapped) == 1 else wrapped
        source = triples_source([_webnlg_triple(t) for t in entry["modifiedtripleset"]], "webnlg", paper)
        category = entry.get("category")
        for lex in entry.get("lexicalisations", []):
            if lex.get("comment", "good") != "good":
                continue
            examples.append(Example(source, str(lex["lex"]).strip(), category))
    return examples


def load_dart(path: str | Path, paper: bool = True) -> list[Example]:
    """DART JSON: a list of `{"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}, ...]}`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    examples = []
    for entry in data:
        source = triples_source(entry["tripleset"], "dart", paper)
        for ann in entry.get("annotations", []):
            examples.append(Example(source, str(ann["text"]).strip()))
    return examples


def _load_jsonl(path: str | Path, source_key: str, target_key: str) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if source_key not in row or target_key not in row:
                raise ValueError(f"{path}:{line_no}: expected keys {source_key!r} and {target_key!r}")
            examples.append(Example(str(row[source_key]).strip(), str(row[target_key]).strip()))
    return examples


def load_xsum(path: str | Path, paper: bool = True) -> list[Example]:
    """XSum-style JSONL: one `{"document": ..., "summary": ...}` object per line."""
    return _load_jsonl(path, "document", "summary")


def load_jsonl(path: str | Path, paper: bool = True) -> list[Example]:
    """Generic JSONL: one `{"source": ..., "target": ...}` object per line."""
    return _load_jsonl(path, "source", "target")


LOADERS = {"e2e": load_e2e, "webnlg": load_webnlg, "dart": load_dart, "xsum": load_xsum, "jsonl": load_jsonl}


def load_examples(path: str | Path, fmt: str, paper: bool = True) -> list[Example]:
    """Load a dataset file in one of `FORMATS` (sources in the paper's form unless `paper=False`, see
    `training.formats`); raises ValueError on an unknown format or empty file."""
    if fmt not in LOADERS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {list(FORMATS)}")
    examples = LOADERS[fmt](path, paper)
    if not examples:
        raise ValueError(f"{path}: no examples found (format {fmt})")
    return examples


def prepend_source(examples: Sequence[Example], text: str | None) -> list[Example]:
    """`text + " " + source` for each example (the paper's real-word init); unchanged when None."""
    if not text:
        return list(examples)
    return [Example(f"{text} {ex.source}", ex.target, ex.category) for ex in examples]


def group_references(examples: Sequence[Example]) -> list[EvalItem]:
    """One item per distinct source (first-seen order) with all of its references."""
    refs: dict[str, list[str]] = {}
    categories: dict[str, str | None] = {}
    for ex in examples:
        refs.setdefault(ex.source, []).append(ex.target)
        categories.setdefault(ex.source, ex.category)
    return [EvalItem(source, targets, categories[source]) for source, targets in refs.items()]


# ------------------------------------------------------------------------------------------ tokenisation


def encode_causal(
    tokenizer: Any,
    examples: Sequence[Example],
    sep_id: int,
    eos_id: int,
    truncation: Truncation,
    leading_space: bool = False,
) -> list[dict[str, list[int]]]:
    """Decoder-only rows: `input_ids = source <sep> target <eos>`, labels -100 except on `target <eos>`.
    `leading_space`: tokenise `" " + source` as the paper's code does (the CLI's default)."""
    rows = []
    for ex in examples:
        src = causal_prompt(tokenizer, ex.source, sep_id, truncation, leading_space)[:-1]
        tgt = tokenizer(" " + ex.target, add_special_tokens=False)["input_ids"][
            : truncation.max_target_tokens
        ]
        input_ids = [*src, sep_id, *tgt, eos_id]
        # The loss is on what follows the separator: HF shifts labels, so label[t] is predicted at t-1.
        labels = [IGNORE_INDEX] * (len(src) + 1) + [*tgt, eos_id]
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def causal_prompt(
    tokenizer: Any, source: str, sep_id: int, truncation: Truncation, leading_space: bool = False
) -> list[int]:
    """The generation prompt for a source: `source <sep>`, tokenised and truncated exactly as in training."""
    text = " " + source if leading_space else source
    src = tokenizer(text, add_special_tokens=False)["input_ids"][: truncation.max_source_tokens]
    return [*src, sep_id]


def encode_seq2seq(
    tokenizer: Any,
    examples: Sequence[Example],
    bos_id: int,
    eos_id: int,
    decoder_start_id: int,
    truncation: Truncation,
    bos_in_target: bool = False,
) -> list[dict[str, list[int]]]:
    """Encoder-decoder rows: `input_ids = [bos] source [eos]`, `decoder_input_ids = [start] target`,
    `labels = target [eos]` (every label is a target token: the decoder sees no source).

    `bos_in_target` (the CLI's default, the paper's BART code): the target is `[bos] target`, so the
    decoder input is `[start] [bos] target` and the labels `[bos] target [eos]`, as HF's tokenizer +
    `shift_tokens_right` make them; generation then emits `<s>` first (dropped when decoding)."""
    rows = []
    for ex in examples:
        src = seq2seq_source(tokenizer, ex.source, bos_id, eos_id, truncation)
        tgt = tokenizer(" " + ex.target, add_special_tokens=False)["input_ids"][
            : truncation.max_target_tokens
        ]
        tgt = [bos_id, *tgt] if bos_in_target else tgt
        rows.append(
            {"input_ids": src, "decoder_input_ids": [decoder_start_id, *tgt], "labels": [*tgt, eos_id]}
        )
    return rows


def seq2seq_source(
    tokenizer: Any, source: str, bos_id: int, eos_id: int, truncation: Truncation
) -> list[int]:
    """The encoder input for a source: `[bos] source [eos]`, source truncated to its first tokens."""
    src = tokenizer(" " + source, add_special_tokens=False)["input_ids"][: truncation.max_source_tokens]
    return [bos_id, *src, eos_id]


def _pad(seqs: Sequence[Sequence[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[*s, *([value] * (width - len(s)))] for s in seqs], dtype=torch.long)


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch: ids with `pad_id`, labels with -100, plus `attention_mask` (1 = token) over
    `input_ids`. Works for both formats (decoder_input_ids is padded like input_ids when present)."""
    batch = {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id),  # [B, S]
        "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0),  # [B, S]
        "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX),  # [B, S] or [B, T]
    }
    if "decoder_input_ids" in rows[0]:
        batch["decoder_input_ids"] = _pad([r["decoder_input_ids"] for r in rows], pad_id)  # [B, T]
    return batch

"""The replication's data: an LM corpus and disjoint task splits from the shipped E2E files.

- LM corpus (`devset.csv`): every reference, and every distinct MR in the paper's `attr : value |`
  form, as separate lines in one shuffled list: the model learns both "languages" but never sees an MR
  next to its own references.
- Task (`testset_w_refs.csv`, MRs disjoint from the corpus): distinct MRs shuffled and cut into train /
  dev / test MRs; all references of an MR stay in its split. Low-data sets are `n` (MR, reference)
  pairs drawn from the train split with a seed.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from training.formats import e2e_source


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {"mr": r["mr"].strip(), "ref": r["ref"].strip()} for r in csv.DictReader(f) if r["mr"].strip()
        ]


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["mr", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def lm_corpus(rows: list[dict[str, str]], seed: int) -> list[str]:
    """References and distinct MRs (paper form) as separate lines, shuffled."""
    lines = [r["ref"] for r in rows] + sorted({e2e_source(r["mr"]) for r in rows})
    random.Random(seed).shuffle(lines)
    return lines


def task_splits(
    rows: list[dict[str, str]], num_dev_mrs: int, num_test_mrs: int, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / dev / test splits by MR (all of an MR's references in one split)."""
    mrs = sorted({r["mr"] for r in rows})
    random.Random(seed).shuffle(mrs)
    test, dev = set(mrs[:num_test_mrs]), set(mrs[num_test_mrs : num_test_mrs + num_dev_mrs])
    return {
        "train": [r for r in rows if r["mr"] not in test and r["mr"] not in dev],
        "dev": [r for r in rows if r["mr"] in dev],
        "test": [r for r in rows if r["mr"] in test],
    }


def low_data(train: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """`n` (MR, reference) pairs drawn from the train split."""
    return random.Random(seed).sample(train, n)


def slot_coverage(mr: str, text: str) -> float:
    """Fraction of the MR's values (all but `familyFriendly`, whose yes/no is phrased freely) that
    appear verbatim, case-insensitively, in `text`: a lexical proxy for "says what the MR says"."""
    from training.formats import parse_mr

    values = [v.lower() for a, v in parse_mr(mr) if a != "familyFriendly"]
    if not values:
        return 1.0
    low = text.lower()
    return sum(v in low for v in values) / len(values)

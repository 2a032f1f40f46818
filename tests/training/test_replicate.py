"""The replication's data rules (the experiment itself is `make replicate`, not a test)."""

from __future__ import annotations

from pathlib import Path

from training.formats import e2e_source
from training.replicate import splits

DATA = Path(__file__).resolve().parents[2] / "replicate" / "data" / "e2e"


def test_task_mrs_are_disjoint_from_the_lm_corpus_and_from_each_other() -> None:
    corpus_rows = splits.read_rows(DATA / "devset.csv")
    task = splits.task_splits(splits.read_rows(DATA / "testset_w_refs.csv"), 20, 80, seed=0)
    mrs = {name: {r["mr"] for r in rows} for name, rows in task.items()}
    assert len(mrs["dev"]) == 20 and len(mrs["test"]) == 80
    assert not (mrs["train"] & mrs["dev"] or mrs["train"] & mrs["test"] or mrs["dev"] & mrs["test"])
    corpus = set(splits.lm_corpus(corpus_rows, seed=0))
    # The LM never sees a task MR, and sees its own MRs and references only as separate lines.
    assert not any(e2e_source(mr) in corpus for mr in mrs["train"] | mrs["test"])
    assert all("<|endoftext|>" not in line for line in corpus)
    low = splits.low_data(task["train"], 100, seed=1)
    assert len(low) == 100 and all(r in task["train"] for r in low)
    assert low != splits.low_data(task["train"], 100, seed=2)


def test_slot_coverage_counts_values_said_verbatim() -> None:
    mr = "name[Cotto], eatType[pub], food[Thai], familyFriendly[yes]"
    assert splits.slot_coverage(mr, "Cotto is a Thai pub for families.") == 1.0
    assert splits.slot_coverage(mr, "Cotto is a pub.") == 2 / 3  # familyFriendly is not counted
    assert splits.slot_coverage(mr, "A place.") == 0.0

"""E2E's official metrics and WebNLG's seen/unseen BLEU, pinned to reference values.

Published values: BLEU 48.53 on sacrebleu's README example; NIST 3.3709 and 1.4619 on the BLEU
paper's sentences (nltk's documented `sentence_nist` example); ROUGE-L (COCO) from its formula by hand.
METEOR 1.5 and CIDEr-D: no published value on a fixed input is available offline, so they are pinned
to what pycocoevalcap 1.2 computes on the sacrebleu example (deterministic: a regression pin).
"""

from __future__ import annotations

import shutil

import pytest

from training.metrics import coco_metrics, corpus_bleu, nist, webnlg_bleu

# sacrebleu README: "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)"
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "The dog had bit the man."],
    ["It was not unexpected.", "No one was surprised."],
    ["The man bit him first.", "The man had bitten the dog."],
]
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
HYP2 = "It is to insure the troops forever hearing the activity guidebook that party direct"
NIST_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]


def test_bleu_equals_sacrebleus_published_example() -> None:
    bleu = corpus_bleu(SYS, REFS)
    assert round(bleu.score, 2) == 48.53
    assert str(bleu).startswith("BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943")


def test_nist_equals_nltks_documented_values() -> None:
    assert nist([HYP1], [NIST_REFS]) == pytest.approx(3.3709, abs=1e-4)
    assert nist([HYP2], [NIST_REFS]) == pytest.approx(1.4619, abs=1e-4)


def test_webnlg_bleu_splits_seen_and_unseen_categories() -> None:
    hyps = ["a b c d e", "x y z w v"]
    refs = [["a b c d e"], ["q r s t u"]]
    out = webnlg_bleu(hyps, refs, ["Astronaut", "Athlete"])  # seen, unseen
    assert out["bleu_seen"] == pytest.approx(100.0) and out["bleu_unseen"] == pytest.approx(0.0)
    assert 0.0 < out["bleu_all"] < 100.0
    assert "bleu_unseen" not in webnlg_bleu(hyps[:1], refs[:1], ["Astronaut"])


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")
def test_coco_metrics_rouge_by_formula_meteor_cider_pinned() -> None:
    # ROUGE-L (COCO): LCS("the cat sat", "the cat sat on the mat") = 3, P = 1, R = 0.5, beta = 1.2:
    # F = (1 + 1.44) * P * R / (R + 1.44 * P) = 1.22 / 1.94.
    rouge = coco_metrics(["The cat sat."], [["The cat sat on the mat."]])["rougeL_coco"]
    assert rouge == pytest.approx(100 * 1.22 / 1.94, abs=1e-6)
    pinned = coco_metrics(SYS, REFS)
    assert pinned["meteor"] == pytest.approx(41.6456, abs=1e-3)
    assert pinned["cider"] == pytest.approx(3.4931, abs=1e-3)
    assert pinned["rougeL_coco"] == pytest.approx(72.2222, abs=1e-3)

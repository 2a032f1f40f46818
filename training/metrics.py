"""Text-generation metrics beyond BLEU/ROUGE: E2E's official set and WebNLG's seen/unseen split.

E2E's official script (tuetschek/e2e-metrics) reports BLEU, NIST, METEOR, ROUGE-L and CIDEr. Here,
offline, from PyPI:

- BLEU: sacrebleu (13a tokenisation, the mteval-v13a rules the official script runs in Perl).
- NIST: nltk's `corpus_nist` (Doddington 2002) on sacrebleu's 13a tokens, n = 5 as in mteval.
- METEOR 1.5, ROUGE-L (COCO style: LCS F-measure with beta = 1.2, best reference per sentence) and
  CIDEr-D: `pycocoevalcap` (the COCO caption code the official script vendors), after its PTB
  tokenizer; METEOR and the tokenizer run the jars shipped in the package, so they need `java`.
- Not available: SPICE (needs Stanford CoreNLP models downloaded at first use).

All metrics are on a 0-100 scale except NIST and CIDEr (their own scales, as papers report them).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

import sacrebleu

# WebNLG 2017: the 10 categories of its training data ("seen"); the test set adds 5 "unseen" ones
# (Athlete, Artist, CelestialBody, MeanOfTransportation, Politician).
WEBNLG_SEEN = frozenset(
    {
        "Airport",
        "Astronaut",
        "Building",
        "City",
        "ComicsCharacter",
        "Food",
        "Monument",
        "SportsTeam",
        "University",
        "WrittenWork",
    }
)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Any:
    """sacrebleu corpus BLEU with every reference (streams padded with None where a source has fewer)."""
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST (nltk) on 13a tokens."""
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    hyps = [tok(h).split() for h in hypotheses]
    refs = [[tok(r).split() for r in rs] for rs in references]
    return float(corpus_nist(refs, hyps, n=n))


def coco_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR 1.5 and ROUGE-L (x100) and CIDEr-D, as pycocoevalcap computes them (PTB-tokenised)."""
    if shutil.which("java") is None:
        raise RuntimeError("METEOR and the PTB tokenizer need `java` on PATH")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.kill()  # its __del__ would wait on the JVM's lock at interpreter exit
        meteor.meteor_p.wait()
    rouge_score, _ = Rouge().compute_score(gts, res)
    cider_score, _ = Cider().compute_score(gts, res)
    return {
        "meteor": 100.0 * float(meteor_score),
        "rougeL_coco": 100.0 * float(rouge_score),
        "cider": float(cider_score),
    }


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """E2E's official set: BLEU, NIST, METEOR, ROUGE-L (COCO), CIDEr."""
    return {
        "bleu": float(corpus_bleu(hypotheses, references).score),
        "nist": nist(hypotheses, references),
        **coco_metrics(hypotheses, references),
    }


def webnlg_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], categories: Sequence[str | None]
) -> dict[str, float]:
    """BLEU on the seen categories, the unseen ones, and all (the paper's WebNLG columns); a subset
    with no sources is left out."""
    out = {"bleu_all": float(corpus_bleu(hypotheses, references).score)}
    for name, keep in (("bleu_seen", True), ("bleu_unseen", False)):
        idx = [i for i, c in enumerate(categories) if (c in WEBNLG_SEEN) == keep]
        if idx:
            out[name] = float(corpus_bleu([hypotheses[i] for i in idx], [references[i] for i in idx]).score)
    return out

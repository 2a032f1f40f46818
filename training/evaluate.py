"""Evaluation: generate with an exported prefix on a dev/test file and score BLEU and ROUGE.

Generation uses the artifact's tensors through `training.generation` (what the server computes),
greedy or beam search. Sources with several references (E2E, WebNLG, DART) are generated once and
scored against all their references:

- BLEU: `sacrebleu.corpus_bleu` with every reference of every source (streams padded with None where a
  source has fewer references than the most-referenced one; sacrebleu skips those).
- ROUGE-1/2/L: `rouge_score` F1 with `use_stemmer=True`, best over a source's references, averaged
  over sources, times 100.

`evaluate.load(...)` is not used: it fetches metric scripts from a hub and fails offline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rouge_score import rouge_scorer

from modeling.models import LoadedModel
from prefix_store.artifact import PrefixArtifact
from training.data import EvalItem, Truncation, causal_prompt, seq2seq_source
from training.generation import generate_causal, generate_seq2seq
from training.metrics import corpus_bleu, e2e_metrics, webnlg_bleu

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


TABLE_TO_TEXT = ("e2e", "webnlg", "dart")


@dataclass(frozen=True)
class EvalConfig:
    """Decoding settings (`paper_decoding` gives the paper's per format)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    limit: int | None = None  # evaluate only the first N distinct sources
    max_source_tokens: int = 512
    min_new_tokens: int = 0
    ban_newlines: bool = False  # never generate "\n" / "\n\n" tokens (one reference per line in the paper)
    early_stopping: bool = True
    leading_space: bool = False  # GPT-2 source tokenised as " " + source (the paper's form; CLI default)
    official_metrics: bool = False  # also E2E's NIST, METEOR, ROUGE-L (COCO), CIDEr (needs java)


def paper_decoding(fmt: str) -> dict[str, Any]:
    """The paper's decoding settings for a data format (its gen scripts): table-to-text beam 5 with the
    newline tokens banned (`bad_words_ids=[[628], [198]]`); XSum beam 6, length penalty 0.8; other
    formats greedy. The paper's `min_length=5` counted the prompt (HF 3.x), so with any source of 5+
    tokens it never applied: `min_new_tokens` stays 0. It ran HF's default `early_stopping=False`;
    `early_stopping=True` (stop once `num_beams` hypotheses ended) is ours, HF's usual choice for
    table-to-text, and cheaper."""
    if fmt in TABLE_TO_TEXT:
        return {"num_beams": 5, "length_penalty": 1.0, "ban_newlines": True}
    if fmt == "xsum":
        return {"num_beams": 6, "length_penalty": 0.8, "ban_newlines": False}
    return {"num_beams": 1, "length_penalty": 1.0, "ban_newlines": False}


def newline_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens that are only newlines ("\n" and "\n\n": GPT-2's 198 and 628)."""
    ids = set()
    for text in ("\n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return sorted(ids)


def generate_texts(
    loaded: LoadedModel, prefixes: dict[str, Any] | None, sources: Sequence[str], cfg: EvalConfig
) -> list[str]:
    """Generated text for each source with `prefixes` (kind -> `[layers, 2, H, L, D]`; None = no prefix)."""
    tok = loaded.tokenizer
    trunc = Truncation(max_source_tokens=cfg.max_source_tokens)
    prefixes = dict(prefixes or {})
    suppress = {
        "min_new_tokens": cfg.min_new_tokens,
        "banned_ids": newline_ids(tok) if cfg.ban_newlines else [],
        "early_stopping": cfg.early_stopping,
    }
    if loaded.spec.is_encoder_decoder:
        config = loaded.model.config
        inputs = [seq2seq_source(tok, s, config.bos_token_id, config.eos_token_id, trunc) for s in sources]
        eos = int(config.eos_token_id)
        outputs = generate_seq2seq(
            loaded.model,
            prefixes,
            inputs,
            cfg.max_new_tokens,
            eos,
            cfg.num_beams,
            cfg.length_penalty,
            **suppress,
        )
    else:
        eos = int(tok.eos_token_id)
        prompts = [causal_prompt(tok, s, eos, trunc, cfg.leading_space) for s in sources]
        prefix = prefixes.get("decoder")
        prefix = None if prefix is None else prefix.to(device=loaded.device, dtype=loaded.dtype)
        outputs = generate_causal(
            loaded.model,
            prefix,
            prompts,
            cfg.max_new_tokens,
            eos,
            cfg.num_beams,
            cfg.length_penalty,
            cfg.batch_size,
            **suppress,
        )
    return [tok.decode([t for t in ids if t != eos], skip_special_tokens=True).strip() for ids in outputs]


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU (multi-reference) and mean best-reference ROUGE-1/2/L F1, all on a 0-100 scale."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    bleu = corpus_bleu(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        best = scorer.score_multi(list(refs), hyp)
        for name in ROUGE_TYPES:
            totals[name] += best[name].fmeasure
    rouge = {name: 100.0 * total / max(len(hypotheses), 1) for name, total in totals.items()}
    return {"bleu": float(bleu.score), "bleu_signature": str(bleu), **rouge}


def evaluate(
    loaded: LoadedModel,
    artifact: PrefixArtifact | None,
    items: Sequence[EvalItem],
    cfg: EvalConfig,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """Generate for each item, score against its references, and (optionally) write the results JSON:
    `{"metrics": {...}, "config": {...}, "num_sources", "num_references", "seconds", "task",
    "outputs": [{"source", "generated", "references"}]}`."""
    items = list(items[: cfg.limit] if cfg.limit else items)
    if not items:
        raise ValueError("nothing to evaluate")
    started = time.perf_counter()
    prefixes = artifact.prefixes if artifact is not None else None
    hyps = generate_texts(loaded, prefixes, [it.source for it in items], cfg)
    refs = [it.references for it in items]
    metrics = score(hyps, refs)
    if cfg.official_metrics:
        metrics |= e2e_metrics(hyps, refs)
    if any(it.category for it in items):  # WebNLG: the paper's seen / unseen / all columns
        metrics |= webnlg_bleu(hyps, refs, [it.category for it in items])
    result = {
        "task": artifact.metadata.task if artifact is not None else None,
        "model": loaded.name,
        "metrics": metrics,
        "config": asdict(cfg),
        "num_sources": len(items),
        "num_references": sum(len(it.references) for it in items),
        "seconds": time.perf_counter() - started,
        "outputs": [
            {"source": it.source, "generated": h, "references": it.references, "category": it.category}
            for it, h in zip(items, hyps, strict=True)
        ],
    }
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2))
    return result

"""Source linearisations: the paper's preprocessing (Li & Liang's code) and the plain form.

`paper=True` (the default everywhere) is what the paper's data files and loaders produce:

- E2E: the MR `name[The Vaults], eatType[pub], priceRange[more than £30]` becomes
  `name : The Vaults | Type : pub | price : more than £30`, with the attribute names of the paper's
  release (`eatType` -> `Type`, `priceRange` -> `price`, `familyFriendly` -> `family friendly`).
  The release also tokenised values (`£ 30`); we keep values as written in the E2E CSV.
- WebNLG: `' | s : p : o | s : p : o'`: every triple opened by `' | '` (so the source starts with it),
  underscores kept (`Alan_Bean`).
- DART: `'s : p : o | s : p : o'` with the relation lowercased, underscores kept.

`paper=False` is the earlier plain form: the E2E MR verbatim; triples `s : p : o | ...` with
underscores turned into spaces, relations as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The E2E attribute names of the paper's data release (the others are spelled as in the MR).
E2E_PAPER_ATTRIBUTES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_MR_PAIR = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`name[Alimentum], area[city centre]` -> `[("name", "Alimentum"), ("area", "city centre")]`.

    Raises ValueError when the MR is not a comma-separated list of `attr[value]`."""
    pairs, pos = [], 0
    text = mr.strip()
    while pos < len(text):
        m = _MR_PAIR.match(text, pos)
        if m is None:
            raise ValueError(f"not an E2E meaning representation at {text[pos:]!r}: {mr!r}")
        pairs.append((m.group(1), m.group(2).strip()))
        pos = m.end()
    if not pairs:
        raise ValueError(f"empty E2E meaning representation: {mr!r}")
    return pairs


def e2e_source(mr: str, paper: bool = True) -> str:
    """The E2E source: the paper's `attr : value | ...`, or the MR verbatim (`paper=False`)."""
    if not paper:
        return mr.strip()
    return " | ".join(f"{E2E_PAPER_ATTRIBUTES.get(a, a)} : {v}" for a, v in parse_mr(mr))


def triples_source(triples: Sequence[Sequence[str]], fmt: str, paper: bool = True) -> str:
    """WebNLG/DART triples `[(s, p, o), ...]` linearised as the paper's loaders do (see module doc)."""
    parts = [[str(p).strip() for p in t] for t in triples]
    if not paper:
        return " | ".join(" : ".join(p.replace("_", " ") for p in t) for t in parts)
    if fmt == "dart":
        return " | ".join(f"{s} : {p.lower()} : {o}" for s, p, o in parts)
    return "".join(f" | {s} : {p} : {o}" for s, p, o in parts)


# Truncation lives here, torch-free, so that the API can count a job file's tokens as training will.
@dataclass(frozen=True)
class Truncation:
    """Token limits; sources and targets both keep their first tokens (see training.data)."""

    max_source_tokens: int = 512
    max_target_tokens: int = 128


def default_truncation(fmt: str) -> Truncation:
    """Per-format defaults: XSum 1024/60 (the paper's summarisation code), else 512/128."""
    return Truncation(1024, 60) if fmt == "xsum" else Truncation()

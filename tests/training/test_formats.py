"""Data formats against hand-written samples of the public releases, in the paper's form and plain.

Samples: E2E (e2e-dataset CSV `mr,ref`), WebNLG 2017 challenge JSON (an entry with its category),
DART JSON (a tripleset with upper-case relations), as each release writes them; the expected sources
are what the paper's loaders (XiangLi1999/PrefixTuning) build from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.models import bundled_tokenizer
from training.data import (
    Example,
    Truncation,
    causal_prompt,
    default_truncation,
    encode_causal,
    encode_seq2seq,
    group_references,
    load_examples,
)
from training.formats import parse_mr

E2E_CSV = (
    "mr,ref\n"
    '"name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], '
    'near[Café Adriatic]","The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30."\n'
    '"name[Cotto], familyFriendly[yes], area[riverside]","Cotto is a family friendly place by the river."\n'
)
WEBNLG = {
    "entries": [
        {
            "1": {
                "category": "Astronaut",
                "modifiedtripleset": [
                    {"subject": "Alan_Bean", "property": "occupation", "object": "Test_pilot"},
                    {"subject": "Alan_Bean", "property": "birthPlace", "object": "Wheeler,_Texas"},
                ],
                "lexicalisations": [
                    {"lex": "Alan Bean, born in Wheeler, Texas, was a test pilot.", "comment": "good"},
                    {"lex": "Alan Bean test.", "comment": "bad"},
                ],
            }
        },
        {
            "2": {
                "category": "Athlete",
                "modifiedtripleset": [{"subject": "Aaron_Boogaard", "property": "height", "object": "1.905"}],
                "lexicalisations": [{"lex": "Aaron Boogaard is 1.905 m tall.", "comment": "good"}],
            }
        },
    ]
}
DART = [
    {
        "tripleset": [
            ["Mars Hill College", "JOINED", "1973"],
            ["Mars Hill College", "LOCATION", "Mars Hill, NC"],
        ],
        "subtree_was_extended": False,
        "annotations": [{"source": "WikiTableQuestions_mturk", "text": "Mars Hill College joined in 1973."}],
    }
]


def test_e2e_mr_is_parsed_into_the_papers_attr_value_form(tmp_path: Path) -> None:
    (tmp_path / "e2e.csv").write_text(E2E_CSV, encoding="utf-8")
    paper = load_examples(tmp_path / "e2e.csv", "e2e")
    assert paper[0].source == (
        "name : The Vaults | Type : pub | price : more than £30 | customer rating : 5 out of 5 | near : Café Adriatic"
    )
    assert paper[1].source == "name : Cotto | family friendly : yes | area : riverside"
    plain = load_examples(tmp_path / "e2e.csv", "e2e", paper=False)
    assert plain[1].source == "name[Cotto], familyFriendly[yes], area[riverside]"
    assert [e.target for e in paper] == [e.target for e in plain]


def test_malformed_e2e_mr_is_refused_with_the_offending_text() -> None:
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        parse_mr("name[Cotto], area riverside")
    assert parse_mr("name[A, B], food[Thai]") == [("name", "A, B"), ("food", "Thai")]


def test_webnlg_opens_with_bar_keeps_underscores_and_category(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text(json.dumps(WEBNLG))
    ex = load_examples(tmp_path / "w.json", "webnlg")
    assert ex[0] == Example(
        " | Alan_Bean : occupation : Test_pilot | Alan_Bean : birthPlace : Wheeler,_Texas",
        "Alan Bean, born in Wheeler, Texas, was a test pilot.",
        "Astronaut",
    )
    assert len(ex) == 2 and ex[1].category == "Athlete"  # the "bad" lexicalisation is skipped
    assert [it.category for it in group_references(ex)] == ["Astronaut", "Athlete"]
    plain = load_examples(tmp_path / "w.json", "webnlg", paper=False)
    assert plain[0].source == "Alan Bean : occupation : Test pilot | Alan Bean : birthPlace : Wheeler, Texas"


def test_dart_lowercases_relations(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(DART))
    (ex,) = load_examples(tmp_path / "d.json", "dart")
    assert ex.source == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, NC"
    (plain,) = load_examples(tmp_path / "d.json", "dart", paper=False)
    assert plain.source == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, NC"


def test_gpt2_source_gets_the_papers_leading_space() -> None:
    tok = bundled_tokenizer()
    eos = tok.eos_token_id
    with_space = causal_prompt(tok, "name : Cotto", eos, Truncation(), leading_space=True)
    assert tok.convert_ids_to_tokens(with_space[:1]) == ["Ġname"]  # the word as it appears mid-text
    assert tok.convert_ids_to_tokens(causal_prompt(tok, "name : Cotto", eos, Truncation())[:1]) == ["name"]
    (row,) = encode_causal(
        tok, [Example("name : Cotto", "Cotto.")], eos, eos, Truncation(), leading_space=True
    )
    assert row["input_ids"][: len(with_space)] == with_space  # training and generation agree


def test_bart_target_opens_with_bos_in_the_papers_form() -> None:
    tok = bundled_tokenizer()
    bos, eos, start = 0, 2, 2
    (row,) = encode_seq2seq(tok, [Example("a b", "c d")], bos, eos, start, Truncation(), bos_in_target=True)
    tgt = tok(" c d", add_special_tokens=False)["input_ids"]
    assert row["decoder_input_ids"] == [start, bos, *tgt] and row["labels"] == [bos, *tgt, eos]
    (plain,) = encode_seq2seq(tok, [Example("a b", "c d")], bos, eos, start, Truncation())
    assert plain["decoder_input_ids"] == [start, *tgt] and plain["labels"] == [*tgt, eos]


def test_xsum_truncation_defaults_to_the_papers_1024_and_60() -> None:
    assert default_truncation("xsum") == Truncation(1024, 60)
    assert default_truncation("e2e") == Truncation(512, 128)

"""Loaders, label masking, truncation and reference grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.models import bundled_tokenizer
from tests.training.conftest import FIXTURES
from training.data import (
    IGNORE_INDEX,
    Example,
    Truncation,
    collate,
    encode_causal,
    encode_seq2seq,
    group_references,
    load_examples,
)

EOS = 50256


def test_e2e_fixture_loads_and_groups_references() -> None:
    examples = load_examples(FIXTURES / "e2e" / "test.csv", "e2e")
    assert len(examples) == 30
    assert examples[0].source.startswith("name : Blue Spice | ")
    items = group_references(examples)
    assert len(items) == 10
    assert sum(len(it.references) for it in items) == 30
    assert all(len(it.references) >= 1 for it in items) and max(len(it.references) for it in items) > 1


def test_webnlg_dart_xsum_jsonl_loaders(tmp_path: Path) -> None:
    webnlg = {
        "entries": [
            {
                "1": {
                    "modifiedtripleset": [
                        {"subject": "Alan_Bean", "property": "occupation", "object": "Test_pilot"}
                    ],
                    "lexicalisations": [
                        {"lex": "Alan Bean was a test pilot.", "comment": "good"},
                        {"lex": "Bad one.", "comment": "bad"},
                        {"lex": "Alan Bean served as a test pilot."},
                    ],
                }
            }
        ]
    }
    (tmp_path / "webnlg.json").write_text(json.dumps(webnlg))
    ex = load_examples(tmp_path / "webnlg.json", "webnlg", paper=False)
    assert ex == [
        Example("Alan Bean : occupation : Test pilot", "Alan Bean was a test pilot."),
        Example("Alan Bean : occupation : Test pilot", "Alan Bean served as a test pilot."),
    ]
    dart = [
        {
            "tripleset": [["Mars", "ORBITS", "Sun"], ["Mars", "COLOR", "red"]],
            "annotations": [{"text": "Red Mars orbits the Sun."}],
        }
    ]
    (tmp_path / "dart.json").write_text(json.dumps(dart))
    assert load_examples(tmp_path / "dart.json", "dart", paper=False) == [
        Example("Mars : ORBITS : Sun | Mars : COLOR : red", "Red Mars orbits the Sun.")
    ]
    (tmp_path / "x.jsonl").write_text(json.dumps({"document": "Long news.", "summary": "Short."}) + "\n\n")
    assert load_examples(tmp_path / "x.jsonl", "xsum") == [Example("Long news.", "Short.")]
    (tmp_path / "g.jsonl").write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    assert load_examples(tmp_path / "g.jsonl", "jsonl") == [Example("a", "b")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"source": "a"}) + "\n")
    with pytest.raises(ValueError, match="expected keys"):
        load_examples(tmp_path / "bad.jsonl", "jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        load_examples(tmp_path / "g.jsonl", "csv")


def test_causal_labels_mask_source_and_padding() -> None:
    tok = bundled_tokenizer("gpt2")
    rows = encode_causal(
        tok,
        [Example("name[Foo], area[city]", "Foo is in the city."), Example("a", "b")],
        EOS,
        EOS,
        Truncation(),
    )
    row = rows[0]
    src = tok("name[Foo], area[city]", add_special_tokens=False)["input_ids"]
    tgt = tok(" Foo is in the city.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [*src, EOS, *tgt, EOS]
    assert row["labels"][: len(src) + 1] == [IGNORE_INDEX] * (len(src) + 1)
    assert row["labels"][len(src) + 1 :] == [*tgt, EOS]
    batch = collate(rows, EOS)
    short = len(rows[1]["input_ids"])
    assert batch["labels"][1, short:].tolist() == [IGNORE_INDEX] * (batch["labels"].shape[1] - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (batch["labels"].shape[1] - short)


def test_truncation_keeps_first_tokens_and_eos() -> None:
    tok = bundled_tokenizer("gpt2")
    row = encode_causal(
        tok, [Example("one two three four five", "six seven eight nine")], EOS, EOS, Truncation(2, 3)
    )[0]
    assert row["input_ids"] == [
        *tok("one two", add_special_tokens=False)["input_ids"],
        EOS,
        *tok(" six seven eight", add_special_tokens=False)["input_ids"],
        EOS,
    ]
    bart = bundled_tokenizer("bart")
    s2s = encode_seq2seq(bart, [Example("one two three", "four five six")], 0, 2, 2, Truncation(2, 2))[0]
    assert s2s["input_ids"] == [0, *bart(" one two", add_special_tokens=False)["input_ids"], 2]
    assert s2s["decoder_input_ids"][0] == 2 and s2s["labels"][-1] == 2
    assert s2s["decoder_input_ids"][1:] == s2s["labels"][:-1]

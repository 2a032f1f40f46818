"""Incremental detokenization: whole characters only, stop sequences cut and never streamed."""

from __future__ import annotations

from modeling.models import LoadedModel
from server.engine.detokenizer import IncrementalDetokenizer


def stream(
    tiny: LoadedModel, text: str, stop: list[str], max_new: int = 100
) -> tuple[list[str], IncrementalDetokenizer]:
    tok = tiny.tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), max_new, stop, eos_token_id=tok.eos_token_id)
    deltas = []
    for token in tok.encode(text):
        deltas.append(detok.add_token(token))
        if detok.finish_reason:
            break
    return deltas, detok


def test_multibyte_characters_are_never_split(tiny: LoadedModel) -> None:
    text = " naïve 😀 café 日本語 ok"
    assert len(tiny.tokenizer.encode("😀")) > 1  # an emoji spans several byte-level tokens
    deltas, detok = stream(tiny, text, [])
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_sequence_cuts_text_and_holds_back_partial_matches(tiny: LoadedModel) -> None:
    deltas, detok = stream(tiny, " alpha beta ### gamma", ["###"])
    assert detok.finish_reason == "stop_sequence"
    assert detok.text == " alpha beta " == "".join(deltas)
    assert not any("#" in d for d in deltas)


def test_length_and_eos(tiny: LoadedModel) -> None:
    _, detok = stream(tiny, " one two three four", [], max_new=2)
    assert detok.finish_reason == "length" and detok.num_generated == 2
    tok = tiny.tokenizer
    detok = IncrementalDetokenizer(tok, [1], 10, [], eos_token_id=tok.eos_token_id)
    assert detok.add_token(tok.encode(" hi")[0]) == " hi"
    assert detok.add_token(tok.eos_token_id) == ""
    assert detok.finish_reason == "eos_token" and detok.text == " hi"

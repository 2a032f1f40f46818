"""Training files of the fine-tuning API (`training.job_data`): each line shape maps to the training
CLI's data (the same examples its loaders read), and the tokens the API counts while validating a job
are exactly the rows the recipe trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.models import LoadedModel, load_model
from training.cli import build_rows
from training.data import Example, load_e2e
from training.job_data import (
    SHAPES,
    DataFileError,
    ModelShape,
    chat_template,
    count_training_tokens,
    parse_file,
    render_chat,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def models(tiny_gpt2_dir: Path, tiny_bart_dir: Path) -> dict[str, LoadedModel]:
    return {
        "gpt2": load_model(str(tiny_gpt2_dir), device="cpu"),
        "bart": load_model(str(tiny_bart_dir), device="cpu"),
    }


def lines(*rows: dict) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_an_e2e_csv_gives_the_training_loaders_examples():
    path = FIXTURES / "e2e" / "train.csv"
    shape, examples = parse_file(path.read_bytes(), "train.csv")
    assert shape is SHAPES["e2e"]
    assert [(e.source, e.target) for e in examples] == [(e.source, e.target) for e in load_e2e(path)]
    assert examples[0].line == 2  # after the header


def test_chat_lines_train_on_the_last_assistant_message():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    shape, [example] = parse_file(lines({"messages": messages}), "chat.jsonl")
    assert shape.name == "chat" and not shape.paper
    assert (
        example.source
        == render_chat(messages[:2])
        == "system: Be brief.\nuser: Capital of France?\nassistant:"
    )
    assert example.target == "Paris"


def test_a_chat_tasks_template_renders_a_request_as_its_training_sources():
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [
        [{"role": "user", "content": "Capital of France?"}],
        [
            {"role": "system", "content": "Two\nlines, {{ braces }} and <tags>"},
            {"role": "user", "content": " spaced "},
        ],
    ]
    for messages in conversations:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=chat_template("<|endoftext|>")
        )
        assert rendered[0] == render_chat(messages) + "<|endoftext|>"


@pytest.mark.parametrize(
    ("rows", "shape"),
    [
        (
            [
                {"prompt": "red", "completion": "apple pie"},
                {"prompt": " a long one " * 40, "completion": "x " * 200},
            ],
            "prompt_completion",
        ),
        ([{"source": "name : Aromi", "target": "Aromi is a shop."}], "source_target"),
        ([{"document": "word " * 700, "summary": "short " * 80}], "document_summary"),
        ([{"mr": "name[Aromi], area[riverside]", "ref": "Aromi is by the river."}], "e2e"),
    ],
)
@pytest.mark.parametrize("model_name", ["gpt2", "bart"])
def test_counted_tokens_are_the_recipes_rows(rows, shape, model_name, models):
    loaded = models[model_name]
    found, examples = parse_file(lines(*rows), "rows.jsonl")
    assert found.name == shape
    rows_trained = build_rows(
        loaded, [Example(e.source, e.target) for e in examples], found.truncation, paper=found.paper
    )
    trained = sum(len(r["input_ids"]) + len(r.get("decoder_input_ids", [])) for r in rows_trained)

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    model = ModelShape(loaded.spec.is_encoder_decoder, 4096)
    assert count_training_tokens(examples, found, count, model, prefix_length=10) == trained


def test_an_example_beyond_the_models_positions_names_its_line(models):
    tokenizer = models["gpt2"].tokenizer
    _, examples = parse_file(
        lines({"prompt": "a", "completion": "b"}, {"prompt": "word " * 300, "completion": "c"}), "x.jsonl"
    )

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    with pytest.raises(DataFileError, match=r"line 2: the example takes 303 tokens") as caught:
        count_training_tokens(
            examples, SHAPES["prompt_completion"], count, ModelShape(False, 310), prefix_length=8
        )
    assert caught.value.line == 2
    assert (
        count_training_tokens(
            examples, SHAPES["prompt_completion"], count, ModelShape(False, 311), prefix_length=8
        )
        > 0
    )

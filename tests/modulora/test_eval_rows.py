"""What `modulora eval` reads from rows: perplexity text, accuracy groups, prompt and reference."""

import json
from pathlib import Path

import pytest

from modulora.data import ALPACA_PROMPT, DataError, Row, read_rows
from modulora.eval.rows import choice_groups, perplexity_text, prompt_and_reference

CHOICES = [" human", " location"]


def test_perplexity_text_from_a_text_file_or_text_rows(tmp_path: Path) -> None:
    raw = tmp_path / "wiki.raw"
    raw.write_bytes(b"one\r\ntwo\r\n")
    assert perplexity_text(raw) == "one\ntwo\n"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "c")))
    assert perplexity_text(rows) == "a\n\nb\n\nc"
    assert perplexity_text(rows, limit=2) == "a\n\nb"


def test_choice_groups_take_an_index_or_the_choice_text_and_group_by_choice_list() -> None:
    rows = [
        Row(1, {"prompt": "p1", "choices": CHOICES, "label": " location"}),
        Row(2, {"prompt": "p2", "choices": CHOICES, "label": 0}),
        Row(3, {"prompt": "p3", "choices": ["yes", "no"], "label": 1}),
    ]
    assert choice_groups(rows) == {
        tuple(CHOICES): (["p1", "p2"], [1, 0]),
        ("yes", "no"): (["p3"], [1]),
    }


def test_a_label_out_of_range_names_its_line_and_field() -> None:
    with pytest.raises(DataError) as error:
        choice_groups([Row(7, {"prompt": "p", "choices": CHOICES, "label": 2})])
    assert (error.value.line, error.value.field) == (7, "label")
    assert "not one of the 2 choices" in error.value.message


def test_prompt_and_reference_of_each_generation_format(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": "2+2=", "completion": "4"},
        {"instruction": "Say hi", "output": "hi"},
        {"messages": chat},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [prompt_and_reference(row) for row in read_rows(path)]
    assert pairs == [
        ("2+2=", "4"),
        (ALPACA_PROMPT.format(instruction="Say hi", input=""), "hi"),
        (chat[:1], "Hello!"),
    ]


def test_rows_without_a_reference_are_refused_with_their_line() -> None:
    with pytest.raises(DataError) as error:
        prompt_and_reference(Row(4, {"text": "just text"}))
    assert error.value.line == 4 and "text rows have no prompt/reference pair" in error.value.message

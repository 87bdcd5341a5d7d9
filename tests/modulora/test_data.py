"""Reading, detecting, validating and tokenizing finetuning data."""

import hashlib
import json
from pathlib import Path

import pytest
from utils.tiny_lm import tiny_tokenizer

from modulora.data import (
    IGNORE_INDEX,
    DataError,
    build_examples,
    collate,
    dataset_sha256,
    detect_format,
    read_rows,
    validate_file,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello"},
    ]
}
USER_HI = {"role": "user", "content": "hi"}
ROWS_BY_FORMAT = {
    "messages": CHAT,
    "sharegpt": {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello world"}]
    },
    "alpaca": {"instruction": "Say hello.", "input": "", "output": "hello world"},
    "prompt_completion": {"prompt": "Question: hi\nType:", "completion": " hello world"},
    "text": {"text": "The quick brown fox."},
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize("fmt", list(ROWS_BY_FORMAT))
def test_detect_format_from_keys(fmt: str) -> None:
    assert detect_format(ROWS_BY_FORMAT[fmt]) == fmt


def test_read_rows_jsonl_json_and_csv_agree(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c, d", "completion": "e\nf"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('prompt,completion\na,b\n"c, d","e\nf"\n')
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert [r.data for r in read_rows(tmp_path / name)] == rows, name


def test_read_rows_csv_parses_json_messages_cell(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text("messages\n" + '"' + json.dumps(CHAT["messages"]).replace('"', '""') + '"\n')
    assert read_rows(path)[0].data == CHAT


def test_chat_loss_only_on_assistant_turns(tokenizer) -> None:
    (example,) = build_examples([CHAT], "auto", tokenizer, max_seq_len=512)
    assert trained_text(tokenizer, example) == "hello world<|im_end|>\nhello<|im_end|>\n"
    assert len(example["input_ids"]) == len(example["labels"])


def test_weight_zero_turns_are_context_without_loss(tokenizer) -> None:
    """OpenAI's per-message `weight`: 0 keeps the turn in the prompt and out of the loss."""
    weighted = {"messages": [dict(m) for m in CHAT["messages"]]}
    weighted["messages"][2]["weight"] = 0
    (example,) = build_examples([weighted], "auto", tokenizer, max_seq_len=512)
    (plain,) = build_examples([CHAT], "auto", tokenizer, max_seq_len=512)
    assert example["input_ids"] == plain["input_ids"]  # same text: the weight never reaches the template
    assert trained_text(tokenizer, example) == "hello<|im_end|>\n"


TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Capital "},
                                     {"type": "text", "text": "of France?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"q": "France"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris"},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
    ]
}  # fmt: skip


def test_tool_turns_and_text_parts_train_as_openai_accepts_them(tokenizer) -> None:
    (example,) = build_examples([TOOL_CHAT], "auto", tokenizer, max_seq_len=512)
    text = tokenizer.decode(example["input_ids"])
    assert "<|im_start|>user\nCapital of France?<|im_end|>" in text
    assert "<|im_start|>tool\nParis<|im_end|>" in text
    # A template that ignores tool_calls gets them inline, so the assistant turn still teaches the call.
    call = '<tool_call>{"name": "lookup", "arguments": "{\\"q\\": \\"France\\"}"}</tool_call>'
    assert trained_text(tokenizer, example) == f"{call}<|im_end|>\nParis.<|im_end|>\n"


def test_templates_that_render_tool_calls_get_them_as_they_are() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments }}){% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (example,) = build_examples([TOOL_CHAT], "auto", tokenizer, max_seq_len=512)
    assert trained_text(tokenizer, example).startswith('CALL lookup({"q": "France"})<|im_end|>')


def test_sharegpt_renders_like_the_same_chat(tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]}
    assert build_examples([ROWS_BY_FORMAT["sharegpt"]], "auto", tokenizer, 512) == build_examples(
        [chat], "auto", tokenizer, 512
    )


@pytest.mark.parametrize(
    ("fmt", "trained"),
    [
        ("alpaca", "hello world<|im_end|>"),
        ("prompt_completion", " hello world<|im_end|>"),
        ("text", "The quick brown fox.<|im_end|>"),
    ],
)
def test_completion_formats_train_on_completion_and_eos(tokenizer, fmt: str, trained: str) -> None:
    (example,) = build_examples([ROWS_BY_FORMAT[fmt]], fmt, tokenizer, max_seq_len=512)
    assert trained_text(tokenizer, example) == trained


def test_train_on_prompt_labels_every_token(tokenizer) -> None:
    (example,) = build_examples([ROWS_BY_FORMAT["alpaca"]], "alpaca", tokenizer, 512, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_build_examples_truncates_to_max_seq_len(tokenizer) -> None:
    examples = build_examples([ROWS_BY_FORMAT["alpaca"]] * 2, "alpaca", tokenizer, max_seq_len=8)
    assert all(len(e["input_ids"]) == len(e["labels"]) == 8 for e in examples)


def test_packing_concatenates_into_full_sequences(tokenizer) -> None:
    rows = [ROWS_BY_FORMAT["text"]] * 10
    single = build_examples(rows[:1], "text", tokenizer, 512)[0]
    packed = build_examples(rows, "text", tokenizer, max_seq_len=16, packing=True)
    assert all(len(e["input_ids"]) == 16 for e in packed[:-1])
    assert [t for e in packed for t in e["input_ids"]] == single["input_ids"] * 10


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            "messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "messages[0].content"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from"),
        ({"instruction": "do", "output": ""}, "output"),
        ({"instruction": 5, "output": "x"}, "instruction"),
        ({"prompt": "p", "completion": None}, "completion"),
        ({"messages": [USER_HI, {"role": "assistant", "content": "x", "weight": 2}]}, "messages[1].weight"),
        (
            {"messages": [USER_HI | {"weight": 0}, {"role": "assistant", "content": "x"}]},
            "messages[0].weight",
        ),
        ({"messages": [USER_HI, {"role": "assistant", "content": "x", "weight": 0}]}, "messages"),
        (
            {"messages": [USER_HI, {"role": "assistant", "content": "x"}], "tools": [{"type": "function"}]},
            "tools[0].function",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]},
                ]
            },
            "messages[1].tool_calls[0].function",
        ),
    ],
)
def test_malformed_row_error_names_line_and_field(tokenizer, tmp_path: Path, row: dict, field: str) -> None:
    good = ROWS_BY_FORMAT[detect_format(row)]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as caught:
        build_examples(read_rows(path), "auto", tokenizer, 512)
    assert (caught.value.line, caught.value.field) == (3, field)
    assert f"line 3, field {field!r}" in str(caught.value)


def test_read_rows_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(DataError) as caught:
        read_rows(path)
    assert caught.value.line == 3 and "invalid JSON" in caught.value.message


def test_validate_file_reports_rows_stats_and_truncation(tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": "Question: hi\nType:", "completion": " hello" * n} for n in range(1, 21)]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_seq_len=20)
    assert report.ok and report.rows == 20 and report.format == "prompt_completion"
    lengths = [len(e["input_ids"]) for e in build_examples(rows, "auto", tokenizer, 10_000)]
    assert report.token_stats["min"] == min(lengths) and report.token_stats["max"] == max(lengths)
    assert report.token_stats["mean"] == pytest.approx(sum(lengths) / 20)
    assert report.truncated == sum(n > 20 for n in lengths)
    assert sum(b["count"] for b in report.histogram) == 20
    json.dumps(report.to_dict())


def test_validate_file_collects_errors_up_to_max(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}] + [{"prompt": "p", "completion": ""}] * 30
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows), max_errors=5)
    assert not report.ok and report.rows == 31 and report.error_count == 30 and len(report.errors) == 5
    assert report.errors[0] == {"line": 2, "field": "completion", "message": "empty"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "not UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"a": 1}\n', "unknown row format"),
        (b"[{", "invalid JSON"),
        (b"\x00\x01\x02garbage", "invalid JSON"),
    ],
)
def test_validate_file_never_raises_on_bad_input(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(content)
    report = validate_file(path, tiny_tokenizer())
    assert not report.ok
    assert message in report.errors[0]["message"]


def test_collate_pads_right_and_masks_labels() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_dataset_sha256_is_the_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n')
    assert dataset_sha256(path) == hashlib.sha256(b'{"text": "a"}\n').hexdigest()


def test_pad_token_id_falls_back_to_eos_then_zero() -> None:
    from types import SimpleNamespace

    from modulora.data import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a real pad id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0

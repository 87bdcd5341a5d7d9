"""Finetuning data: read JSONL/JSON/CSV rows, detect their format, validate them, tokenize them.

Formats (auto-detected from the first row's keys):
- `messages`: chat, `{"messages": [{"role": "user", "content": ...}, ...]}`, rendered with the
  tokenizer's chat template; loss on assistant turns only. As OpenAI's fine-tuning accepts it:
  roles system/user/assistant/tool, `content` a string or a list of `{"type": "text", "text"}`
  parts, assistant `tool_calls` (content may then be null), `weight` 0 or 1 on an assistant turn
  (0: the turn is context only and carries no loss), and the row's `tools` (function definitions,
  passed to the template as transformers passes them).
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`, mapped to chat.
- `alpaca`: `instruction`, optional `input`, `output`, rendered with the Alpaca prompt.
- `prompt_completion`: `prompt` + `completion`, concatenated as they are (the user owns the separator).
- `text`: raw `text`, every token trained.

An example is `{"input_ids": [...], "labels": [...]}` with -100 on tokens that carry no loss.
Errors name the row's 1-based line (the item's 1-based position for a JSON list) and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
MAX_NESTING = 32
"""Deepest JSON nesting a row may have (a chat row needs about 5); deeper rows are errors, not a
RecursionError somewhere later."""
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Used when a tokenizer has no chat template of its own (base models): ChatML.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DataError(ValueError):
    """A bad row: `line` is 1-based (None for a file-level problem), `field` the offending key."""

    def __init__(self, line: int | None, field: str | None, message: str) -> None:
        self.line, self.field, self.message = line, field, message
        where = f"line {line}" if line is not None else "file"
        super().__init__(f"{where}, field {field!r}: {message}" if field else f"{where}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message}


@dataclasses.dataclass
class Row:
    line: int
    data: dict[str, Any]


# ---------------------------------------------------------------------------------------------- reading


def _iter_rows(path: str | Path) -> Iterator[Row | DataError]:
    """Rows of a .jsonl/.json/.csv file, or a DataError in place of each unreadable one."""
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield DataError(line, None, f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})")
        return
    if not text.strip():
        yield DataError(None, None, "the file is empty")
        return
    suffix = Path(path).suffix.lower()
    first = text.lstrip()[:1]
    if suffix == ".csv" or (suffix not in (".json", ".jsonl") and first not in "[{"):
        yield from _iter_csv(text)
    elif first == "[":
        yield from _iter_json_list(text)
    else:
        yield from _iter_jsonl(text)


def _nesting(value: Any) -> int:
    """How deep `value` nests lists and objects (iterative: deep values must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _loads(text: str, line: int) -> Any:
    """`json.loads` with a nesting limit; raises DataError for invalid or too deeply nested JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(e.lineno + line - 1, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(line, None, f"JSON nested deeper than {MAX_NESTING} levels") from None
    if _nesting(data) > MAX_NESTING:
        raise DataError(line, None, f"JSON nested deeper than {MAX_NESTING} levels")
    return data


def _iter_jsonl(text: str) -> Iterator[Row | DataError]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = _loads(line, line_no)
        except DataError as e:
            yield e
            continue
        yield (
            Row(line_no, data)
            if isinstance(data, dict)
            else DataError(line_no, None, f"expected a JSON object, got {type(data).__name__}")
        )


def _iter_json_list(text: str) -> Iterator[Row | DataError]:
    try:
        items = _loads(text, 1)
    except DataError as e:
        yield e
        return
    if not isinstance(items, list):
        yield DataError(1, None, f"expected a JSON list of objects, got {type(items).__name__}")
        return
    for index, data in enumerate(items, start=1):
        yield (
            Row(index, data)
            if isinstance(data, dict)
            else DataError(index, None, f"expected a JSON object, got {type(data).__name__}")
        )


def _iter_csv(text: str) -> Iterator[Row | DataError]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for data in reader:
            line = reader.line_num
            if None in data:
                yield DataError(
                    line,
                    None,
                    f"{len(data[None]) + len(reader.fieldnames or [])} cells, header has "
                    f"{len(reader.fieldnames or [])}",
                )
                continue
            for key in ("messages", "conversations"):  # nested fields arrive as JSON text in a CSV cell
                if isinstance(data.get(key), str) and data[key].lstrip().startswith("["):
                    try:
                        data[key] = _loads(data[key], line)
                    except DataError as e:
                        yield DataError(line, key, f"in the cell: {e.message}")
                        break
            else:
                yield Row(line, dict(data))
    except csv.Error as e:
        yield DataError(reader.line_num, None, f"invalid CSV: {e}")


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a JSONL/JSON/CSV file; raises the first `DataError`."""
    rows = []
    for item in _iter_rows(path):
        if isinstance(item, DataError):
            raise item
        rows.append(item)
    return rows


def dataset_sha256(path: str | Path) -> str:
    """SHA-256 of the file's bytes (recorded in adapter manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- formats


def detect_format(row: dict[str, Any] | Row) -> str:
    """The format of one row, from its keys (see the module docstring)."""
    line, data = (row.line, row.data) if isinstance(row, Row) else (None, row)
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    raise DataError(
        line,
        None,
        f"unknown row format with keys {sorted(data)}; expected one of: messages, conversations, "
        "instruction+output, prompt+completion, text",
    )


def _string(data: dict[str, Any], key: str, line: int | None, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(
            line, key, "missing" if value is None else f"expected a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise DataError(line, key, "empty")
    return value


def _chat_messages(data: dict[str, Any], fmt: str, line: int | None) -> list[dict[str, Any]]:
    """The row's turns as chat-template messages; an assistant turn with `weight` 0 keeps it (the
    renderer drops the key's loss span, see `_render_chat`)."""
    key, role_key, text_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    turns = data.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(line, key, "expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(line, f"{key}[{i}]", f"expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        allowed = CHAT_ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
        if role not in allowed:
            raise DataError(line, f"{key}[{i}].{role_key}", f"{role!r} is not one of {', '.join(allowed)}")
        role = role if fmt == "messages" else SHAREGPT_ROLES[role]
        message: dict[str, Any] = {"role": role}
        if fmt == "messages":
            message.update(_openai_turn_fields(turn, role, f"{key}[{i}]", line))
        if "content" not in message:
            message["content"] = _text_content(turn.get(text_key), f"{key}[{i}].{text_key}", line)
        messages.append(message)
    trained = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1) == 1]
    if not trained:
        raise DataError(line, key, "no assistant turn to learn from (none, or every one has weight 0)")
    return messages


def _text_content(content: Any, field: str, line: int | None) -> str:
    """A turn's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise DataError(line, f"{field}[{j}]", 'expected a text part {"type": "text", "text": "..."}')
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(line, field, "expected a string or a list of text parts")


def _openai_turn_fields(turn: dict[str, Any], role: str, field: str, line: int | None) -> dict[str, Any]:
    """`weight`, `tool_calls` (content may be null beside them), `tool_call_id` and `name`, checked."""
    fields: dict[str, Any] = {}
    if "weight" in turn:
        if role != "assistant":
            raise DataError(line, f"{field}.weight", "only assistant turns carry a weight")
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise DataError(line, f"{field}.weight", f"expected 0 or 1, got {turn['weight']!r}")
        fields["weight"] = turn["weight"]
    if turn.get("tool_calls") is not None:
        calls = turn["tool_calls"]
        if role != "assistant":
            raise DataError(line, f"{field}.tool_calls", "only assistant turns make tool calls")
        if not isinstance(calls, list) or not calls:
            raise DataError(line, f"{field}.tool_calls", "expected a non-empty list")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise DataError(line, f"{field}.tool_calls[{j}].function", "expected {name, arguments}")
        fields["tool_calls"] = calls
        if turn.get("content") is None:
            fields["content"] = ""
    for extra in ("tool_call_id", "name"):
        if isinstance(turn.get(extra), str):
            fields[extra] = turn[extra]
    return fields


def render(
    data: dict[str, Any], fmt: str, tokenizer: Any, line: int | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """A row as text plus the character spans that carry loss (completions / assistant turns)."""
    if fmt in ("messages", "sharegpt"):
        tools = _tool_definitions(data, line) if fmt == "messages" else None
        return _render_chat(_chat_messages(data, fmt, line), tokenizer, tools)
    if fmt == "alpaca":
        instruction, output = _string(data, "instruction", line), _string(data, "output", line)
        extra = _string(data, "input", line, required=False)
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(
            instruction=instruction, input=extra
        )
        return _with_eos(prompt, output, tokenizer)
    if fmt == "prompt_completion":
        return _with_eos(
            _string(data, "prompt", line, required=False), _string(data, "completion", line), tokenizer
        )
    if fmt == "text":
        return _with_eos("", _string(data, "text", line), tokenizer)
    raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(FORMATS)}")


def _with_eos(prompt: str, completion: str, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    text = prompt + completion + (tokenizer.eos_token or "")
    return text, [(len(prompt), len(text))]


def chat_template(tokenizer: Any) -> str:
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def _apply_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template(tokenizer),
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _tool_definitions(data: dict[str, Any], line: int | None) -> list[dict[str, Any]] | None:
    """A chat row's `tools` (OpenAI's function definitions), handed to the chat template as
    transformers' `apply_chat_template(tools=...)` does."""
    tools = data.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise DataError(line, "tools", "expected a list of tool definitions")
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(line, f"tools[{j}].function", "expected {name, description, parameters}")
    return tools


def _inline_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """For a template that ignores `tool_calls`: the calls appended to the content as Hermes-style
    `<tool_call>{"name", "arguments"}</tool_call>` lines, so the turn still teaches them."""
    if "tool_calls" not in message:
        return message
    calls = [
        "<tool_call>"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"].get("arguments")})
        + "</tool_call>"
        for c in message["tool_calls"]
    ]
    content = "\n".join(([message["content"]] if message["content"] else []) + calls)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def _render_chat(
    messages: list[dict[str, Any]], tokenizer: Any, tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    # Each assistant turn's span is the difference between the conversation rendered up to it with a
    # generation prompt and rendered through it: its content and the template's end-of-turn marker.
    # A turn with weight 0 is context only: it gets no span. The weight never reaches the template.
    weights = [m.get("weight", 1) for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    if "tool_calls" not in chat_template(tokenizer):
        messages = [_inline_tool_calls(m) for m in messages]
    full = _apply_template(tokenizer, messages, False, tools)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or weights[i] == 0:
            continue
        prefix = _apply_template(tokenizer, messages[:i], True, tools) if i else ""
        through = _apply_template(tokenizer, messages[: i + 1], False, tools)
        if full.startswith(prefix) and full.startswith(through) and len(through) > len(prefix):
            start, end = len(prefix), len(through)
        else:  # a template that rewrites earlier turns: fall back to locating the content itself
            start = full.find(message["content"], cursor)
            end = start + len(message["content"])
        spans.append((start, end))
        cursor = end
    return full, spans


# ---------------------------------------------------------------------------------------------- examples


def tokenize(
    text: str, spans: list[tuple[int, int]], tokenizer: Any, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """Token ids and labels; a token carries loss when it starts inside one of `spans`."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if train_on_prompt:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": input_ids, "labels": labels}


def _as_row(row: Row | dict[str, Any], index: int) -> Row:
    return row if isinstance(row, Row) else Row(index, row)


def build_examples(
    rows: Sequence[Row | dict[str, Any]],
    fmt: str,
    tokenizer: Any,
    max_seq_len: int,
    train_on_prompt: bool = False,
    packing: bool = False,
) -> list[dict[str, list[int]]]:
    """Tokenized examples `{"input_ids", "labels"}`, truncated to `max_seq_len` tokens.

    fmt: one of FORMATS or "auto" (detected from the first row). packing: concatenate the examples
    and cut the stream into `max_seq_len`-token sequences (fewer pad tokens, examples may see the
    end of the previous one). Raises `DataError` naming the first bad row's line and field.
    """
    if max_seq_len <= 1:
        raise ValueError(f"max_seq_len: {max_seq_len} must be at least 2")
    rows = [_as_row(row, i) for i, row in enumerate(rows, start=1)]
    if not rows:
        raise DataError(None, None, "no rows")
    if fmt == "auto":
        fmt = detect_format(rows[0])
    elif fmt not in FORMATS:
        raise ValueError(f"fmt: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    examples = []
    for row in rows:
        text, spans = render(row.data, fmt, tokenizer, row.line)
        example = tokenize(text, spans, tokenizer, train_on_prompt)
        examples.append(example if packing else {k: v[:max_seq_len] for k, v in example.items()})
    return pack(examples, max_seq_len) if packing else examples


def pack(examples: Sequence[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut the stream into sequences of `max_seq_len` tokens (last one shorter)."""
    input_ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [
        {"input_ids": input_ids[i : i + max_seq_len], "labels": labels[i : i + max_seq_len]}
        for i in range(0, len(input_ids), max_seq_len)
    ]


# ---------------------------------------------------------------------------------------------- validation


@dataclasses.dataclass
class DatasetReport:
    """What `validate_file` found. token_stats/histogram/truncated are None without a tokenizer."""

    rows: int
    format: str | None
    errors: list[dict[str, Any]]
    error_count: int
    token_stats: dict[str, float] | None = None
    histogram: list[dict[str, int]] | None = None
    truncated: int | None = None
    max_seq_len: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.rows > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}


def _percentile(sorted_values: list[int], q: float) -> float:
    position = (len(sorted_values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _histogram(lengths: list[int], bins: int = 10) -> list[dict[str, int]]:
    """Equal-width bins over [0, max]: `{"start", "end", "count"}` (end exclusive, last inclusive)."""
    width = max(1, math.ceil((max(lengths) + 1) / bins))
    counts = [0] * math.ceil((max(lengths) + 1) / width)
    for n in lengths:
        counts[n // width] += 1
    return [{"start": i * width, "end": (i + 1) * width, "count": c} for i, c in enumerate(counts)]


def validate_file(
    path: str | Path, tokenizer: Any = None, max_errors: int = 20, max_seq_len: int = 2048, fmt: str = "auto"
) -> DatasetReport:
    """Check every row of an uploaded file; never raises on bad content, reports it instead.

    Returns the row count, the detected format, up to `max_errors` errors `{line, field, message}`
    (error_count counts all), and with a tokenizer the token-length statistics, a histogram and how
    many rows exceed `max_seq_len`.
    """
    errors: list[DataError] = []
    lengths: list[int] = []
    rows = 0
    try:
        for item in _iter_rows(path):
            if isinstance(item, DataError):
                errors.append(item)
                continue
            rows += 1
            try:
                if fmt == "auto":
                    fmt = detect_format(item)
                text, spans = render(item.data, fmt, tokenizer or _NoTokenizer(), item.line)
                if tokenizer is not None:
                    example = tokenize(text, spans, tokenizer)
                    if all(label == IGNORE_INDEX for label in example["labels"][:max_seq_len]):
                        raise DataError(
                            item.line, None, f"no completion token within the first {max_seq_len} tokens"
                        )
                    lengths.append(len(example["input_ids"]))
            except DataError as e:
                errors.append(e)
            except Exception as e:  # a tokenizer or template failing on odd content is a row error too
                errors.append(DataError(item.line, None, f"cannot render the row: {type(e).__name__}: {e}"))
    except OSError as e:
        errors.append(DataError(None, None, f"cannot read the file: {e}"))
    if rows == 0 and not errors:
        errors.append(DataError(None, None, "no rows"))
    report = DatasetReport(
        rows=rows,
        format=None if fmt == "auto" else fmt,
        errors=[e.to_dict() for e in errors[:max_errors]],
        error_count=len(errors),
    )
    if lengths:
        ordered = sorted(lengths)
        report.token_stats = {
            "min": ordered[0],
            "mean": sum(ordered) / len(ordered),
            "p50": _percentile(ordered, 0.5),
            "p95": _percentile(ordered, 0.95),
            "max": ordered[-1],
        }
        report.histogram = _histogram(lengths)
        report.truncated = sum(n > max_seq_len for n in lengths)
        report.max_seq_len = max_seq_len
    return report


class _NoTokenizer:
    """Stands in for a tokenizer when validating structure only: no EOS, ChatML rendering."""

    eos_token = ""
    chat_template = DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, **_: Any
    ) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else 0 (padding is
    masked out of attention and loss, so any id serves where the tokenizer names none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded tensors `input_ids`, `attention_mask`, `labels` [batch, longest]."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

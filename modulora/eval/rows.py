"""What each eval task reads from a dataset file (`modulora eval --data`), torch-free.

perplexity: a text file (.raw/.txt), or rows with `text`; accuracy: rows `{prompt, choices, label}`
(label: the index or the text of the right choice); exact match and ROUGE: prompt/completion,
Alpaca or chat rows, whose completion, output or last assistant turn is the reference. A row that
does not fit raises `modulora.data.DataError` with its line and field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modulora.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, DataError, Row, detect_format, read_rows

TEXT_SUFFIXES = (".raw", ".txt")


def perplexity_text(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """A text file as it is (CRLF read as LF), or the `text` of the first `limit` rows, a blank line
    between rows."""
    path = Path(path)
    if path.suffix in TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return "\n\n".join(str(row.data["text"]) for row in read_rows(path)[:limit])


def choice_groups(rows: Sequence[Row]) -> dict[tuple[str, ...], tuple[list[str], list[int]]]:
    """Accuracy rows grouped by their choice list: {choices: (prompts, label indices)}."""
    groups: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
    for row in rows:
        choices, label = tuple(row.data["choices"]), row.data["label"]
        index = choices.index(label) if isinstance(label, str) else int(label)
        if not 0 <= index < len(choices):
            raise DataError(row.line, "label", f"{label!r} is not one of the {len(choices)} choices")
        prompts, labels = groups.setdefault(choices, ([], []))
        prompts.append(row.data["prompt"])
        labels.append(index)
    return groups


def prompt_and_reference(row: Row) -> tuple[str | list[dict[str, Any]], str]:
    """(prompt, reference) of a generation row; a chat prompt is its messages before the last."""
    data, fmt = row.data, detect_format(row)
    if fmt == "prompt_completion":
        return data["prompt"], data["completion"]
    if fmt == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if data.get("input") else ALPACA_PROMPT
        return template.format(instruction=data["instruction"], input=data.get("input", "")), data["output"]
    if fmt == "messages" and data["messages"][-1]["role"] == "assistant":
        return data["messages"][:-1], data["messages"][-1]["content"]
    raise DataError(
        row.line,
        None,
        f"{fmt} rows have no prompt/reference pair: use prompt/completion, alpaca or chat rows",
    )

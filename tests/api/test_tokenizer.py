"""api.tokenizer.LightTokenizer gives the upload report the same token counts as transformers."""

from __future__ import annotations

import pytest

from api.tokenizer import load_light_tokenizer
from modulora import data

pytestmark = pytest.mark.slow
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
]  # fmt: skip


def test_light_tokenizer_matches_transformers_on_smollm2_chat_rows() -> None:
    from modulora.models import load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    light, full = load_light_tokenizer(folder), load_tokenizer(folder)
    assert light is not None
    for row in ROWS:
        light_text, light_spans = data.render(row, "messages", light)
        full_text, full_spans = data.render(row, "messages", full)
        assert light_text == full_text and light_spans == full_spans
        assert data.tokenize(light_text, light_spans, light) == data.tokenize(full_text, full_spans, full)

"""api.tokenizer.LightTokenizer gives the upload report the same token counts as transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from utils.tiny_lm import tiny_tokenizer

from api.tokenizer import load_light_tokenizer
from modulora import data

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
]  # fmt: skip


@pytest.mark.slow
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


# Uses what the old Jinja sandbox lacked: `{% generation %}`, loop controls (`{% break %}`,
# `{% continue %}`), `raise_exception` and HF's `tojson`.
HF_FEATURES_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message.role) }}{% endif %}"
    "{% if message.role == 'system' and loop.index0 > 0 %}{% continue %}{% endif %}"
    "{% if message.content == 'STOP' %}{% break %}{% endif %}"
    "{{ bos_token }}{{ message.role }}\n"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}"
    "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ message.content }}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)
HF_FEATURE_ROWS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                  {"role": "system", "content": "skipped by continue"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "STOP"},
                  {"role": "assistant", "content": "never rendered"}]},
    {"messages": [{"role": "user", "content": "Capital?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
                  {"role": "tool", "content": "Paris"}, {"role": "assistant", "content": "Paris."}],
     "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]},
]  # fmt: skip


def test_upload_report_and_training_render_hf_templates_token_for_token(tmp_path: Path) -> None:
    """The upload report (torch-free LightTokenizer) and training (the transformers tokenizer) render
    through transformers' own renderer, so they agree even on generation blocks and loop controls."""
    full = tiny_tokenizer()
    full.chat_template = HF_FEATURES_TEMPLATE
    full.save_pretrained(tmp_path / "model")
    light = load_light_tokenizer(tmp_path / "model")
    assert light is not None
    for row in HF_FEATURE_ROWS:
        light_text, light_spans = data.render(row, "messages", light)
        full_text, full_spans = data.render(row, "messages", full)
        assert light_text == full_text and light_spans == full_spans
        assert "never rendered" not in light_text and "skipped" not in light_text
        assert ('TOOLS [{"type": "function"' in light_text) == ("tools" in row)
        assert data.tokenize(light_text, light_spans, light) == data.tokenize(full_text, full_spans, full)

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HF_FEATURE_ROWS))
    report = data.validate_file(path, tokenizer=light)
    examples = data.build_examples(data.read_rows(path), "auto", full, max_seq_len=512)
    assert report.ok, report.errors
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert (report.token_stats["min"], report.token_stats["max"]) == (lengths[0], lengths[-1])

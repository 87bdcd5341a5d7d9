"""An upload renders every row with one compiled chat template (compiling costs ~7 ms a row).
Responsiveness under load on PostgreSQL is in tests/faults/."""

from __future__ import annotations

import jinja2.sandbox
import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from api.tokenizer import load_light_tokenizer
from modulora import data
from tests.api.conftest import CHAT_ROW, jsonl


@pytest.mark.slow
def test_upload_compiles_the_chat_template_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    from modulora.models import resolve_model

    compiled: list[str] = []
    from_string = jinja2.sandbox.ImmutableSandboxedEnvironment.from_string

    def counting(self, source, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        compiled.append(source)
        return from_string(self, source, *args, **kwargs)

    monkeypatch.setattr(jinja2.sandbox.ImmutableSandboxedEnvironment, "from_string", counting)
    _compile_jinja_template.cache_clear()  # transformers' renderer keeps compiled templates per process
    tokenizer = load_light_tokenizer(resolve_model("smollm2-135m-instruct"))
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl([CHAT_ROW], copies=50))
    report = data.validate_file(path, tokenizer=tokenizer)
    assert report.ok and report.rows == 50
    assert len(compiled) == 1

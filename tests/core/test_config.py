"""core/config.py: base models by name, and the inference budget's two environment names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.config import ServiceSettings


def test_base_models_map_names_to_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODULORA_BASE_MODELS", '{"acme/llama:v1": "/models/llama", "hub": "acme/tiny"}')
    assert ServiceSettings().base_models == {"acme/llama:v1": "/models/llama", "hub": "acme/tiny"}


def test_the_list_form_names_each_source_by_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODULORA_BASE_MODELS", '["smollm2-135m-instruct", "/models/llama-2-7b/"]')
    assert ServiceSettings().base_models == {
        "smollm2-135m-instruct": "smollm2-135m-instruct",
        "llama-2-7b": "/models/llama-2-7b/",
    }


@pytest.mark.parametrize("name", ["", " padded", "ft:looks-fine-tuned"])
def test_a_name_that_cannot_be_a_base_model_id_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("MODULORA_BASE_MODELS", f'{{"{name}": "/models/x"}}')
    with pytest.raises(ValidationError, match="base model name"):
        ServiceSettings()


@pytest.mark.parametrize(
    "variable", ["MODULORA_INFERENCE_MEMORY_BUDGET_BYTES", "MODULORA_INFERENCE_MEMORY_BYTES"]
)
def test_the_inference_budget_reads_either_name(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, str(8 * 1024**3))
    assert ServiceSettings().inference_memory_budget_bytes == 8 * 1024**3

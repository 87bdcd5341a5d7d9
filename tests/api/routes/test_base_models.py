"""Base models by name (MODULORA_BASE_MODELS): ids are names, never paths; a name maps to a folder
or a Hugging Face cache id; every route takes ids with `/` and `:`; a broken folder or a model over
the budget is a 400 naming the field at job creation."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import huggingface_hub.constants
import pytest
import torch

from api.inference.service import get_inference_engine
from core.bases import base_model_problem, base_model_source, job_base
from core.config import get_settings
from core.db.models import Job, Model, User
from core.db.session import session_scope
from modulora.serve.engine import InferenceEngine, size_from_files
from modulora.serve.events import DoneEvent, FinishEvent, TextEvent
from modulora.serve.types import EngineConfig
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.api.engines import scripted_engine
from tests.utils.model_folders import LLAMA_7B_CONFIG, write_hf_cache_entry, write_sharded_model

NAME = "acme/llama:v1"


@pytest.fixture
def models(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Base models named NAME (a folder), "hub-llama" (a Hugging Face id in the local cache) and the
    built-in model; {name: folder}."""
    folder = write_sharded_model(tmp_path / "models" / "llama")
    snapshot = write_hf_cache_entry(tmp_path / "hub", "acme/tiny-llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sources = {
        NAME: str(folder),
        "hub-llama": "acme/tiny-llama",
        "smollm2-135m-instruct": "smollm2-135m-instruct",
    }
    monkeypatch.setenv("MODULORA_BASE_MODELS", json.dumps(sources))
    get_settings.cache_clear()
    return {NAME: folder, "hub-llama": snapshot}


def create_job(service: Service, model: str, **hyperparameters: object) -> object:
    headers = service.new_key("alice")
    file = service.upload(headers, jsonl([CHAT_ROW], copies=10))
    body = {
        "model": model,
        "training_file": file["id"],
        "hyperparameters": {"quantization": "rtn", **hyperparameters},
    }
    return service.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)


def test_models_are_listed_and_retrieved_by_name_never_by_path(
    service: Service, models: dict[str, Path]
) -> None:
    headers = service.new_key("ada")
    listed = service.client.get("/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == [NAME, "hub-llama", "smollm2-135m-instruct"]
    assert not any(str(folder) in json.dumps(listed) for folder in models.values())
    response = service.client.get(f"/v1/models/{NAME}", headers=headers)
    assert response.status_code == 200 and response.json()["id"] == NAME
    assert service.client.delete(f"/v1/models/{NAME}", headers=headers).status_code == 403


def test_a_hugging_face_cache_id_resolves_to_its_snapshot_and_the_base_lives_under_home(
    service: Service, models: dict[str, Path]
) -> None:
    assert base_model_source("hub-llama") == str(models["hub-llama"])
    assert base_model_source(NAME) == str(models[NAME])
    response = create_job(service, "hub-llama")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["model"] == "hub-llama"
    base = Path(job_base(job["model"], job["hyperparameters"]))
    assert base.parent == get_settings().bases_dir and base.name.startswith("hub-llama-rtn-4b-")
    slashed = Path(job_base(NAME, job["hyperparameters"]))
    assert slashed.parent == get_settings().bases_dir and slashed.name.startswith("acme-llama-v1-rtn-4b-")


def test_a_folder_that_is_not_a_model_is_a_400_naming_the_model(
    service: Service, models: dict[str, Path]
) -> None:
    (models[NAME] / "config.json").unlink()
    response = create_job(service, NAME)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "is not a model folder: it has no config.json" in error["message"]


def test_a_missing_shard_is_a_400_naming_the_shard(service: Service, models: dict[str, Path]) -> None:
    assert base_model_problem(NAME) is None
    (models[NAME] / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in (base_model_problem(NAME) or "")  # what `serve` prints
    response = create_job(service, NAME)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "missing 1 of its 2 weight shards" in error["message"]
    assert "model-00002-of-00002.safetensors" in error["message"]


def test_a_model_over_the_gpu_budget_is_a_400_before_any_work(
    service: Service, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (models[NAME] / "config.json").write_text(json.dumps(LLAMA_7B_CONFIG))
    monkeypatch.setenv("MODULORA_GPU_MEMORY_BUDGET_BYTES", str(2 * 1024**3))
    get_settings.cache_clear()
    response = create_job(service, NAME)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("hyperparameters", "insufficient_memory")


def test_chat_with_a_base_named_with_slash_and_colon_serves_its_folder(
    service: Service, models: dict[str, Path]
) -> None:
    engine = scripted_engine([TextEvent(0, "Hi"), FinishEvent(0, "stop"), DoneEvent(3, 1)])
    service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}]}
    response = service.client.post("/v1/chat/completions", headers=service.new_key("ada"), json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == NAME
    spec = engine.submitted[0][0]
    assert (spec.id, spec.base) == (NAME, str(models[NAME]))


def test_a_fine_tuned_model_of_such_a_base_works_on_every_model_route(
    service: Service, models: dict[str, Path]
) -> None:
    headers = service.new_key("ada")
    model_id = f"ft:{NAME}:v2:ftjob-abc"
    adapter = service.home / "adapters" / "ftjob-abc"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with session_scope() as session:
        user = session.query(User).filter(User.name == "ada").one()
        job = Job(user_id=user.id, model=NAME, training_file="file-x", seed=0, status="succeeded",
                  hyperparameters={"quantization": "rtn"})  # fmt: skip
        session.add(job)
        session.flush()
        session.add(Model(id=model_id, user_id=user.id, job_id=job.id, parent=NAME, base="bases/x",
                          path="adapters/ftjob-abc"))  # fmt: skip

    assert service.client.get(f"/v1/models/{model_id}", headers=headers).json()["parent"] == NAME
    # The dashboard encodes the id as one path segment; the route takes it with its `/` and `:`.
    response = service.client.get(
        f"/v1/dashboard/models/{quote(model_id, safe='')}/download", headers=headers
    )
    assert response.status_code == 200, response.text
    assert zipfile.ZipFile(io.BytesIO(response.content)).namelist() == [
        "ft_acme_llama_v1_v2_ftjob-abc/adapter_config.json"
    ]
    assert service.client.delete(f"/v1/models/{model_id}", headers=headers).status_code == 200
    assert not adapter.exists()


def must_not_load(ref: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    raise AssertionError(f"{ref} must not load")


def chat_error(service: Service, engine: InferenceEngine) -> tuple[int, dict[str, Any]]:
    service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
    try:
        body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}]}
        response = service.client.post("/v1/chat/completions", headers=service.new_key("ada"), json=body)
    finally:
        engine.shutdown()
    return response.status_code, response.json()["error"]


def test_chat_with_a_base_over_the_inference_budget_is_a_400_before_it_loads(
    service: Service, models: dict[str, Path]
) -> None:
    config = EngineConfig(device="cpu", memory_budget_bytes=64 * 1024**2, max_seq_len=64)
    status, error = chat_error(service, InferenceEngine(config, must_not_load, size_from_files))
    assert status == 400
    assert (error["param"], error["code"]) == ("model", "model_too_large")
    assert "does not fit the inference memory budget of 0.06 GiB" in error["message"]


def test_chat_with_a_base_missing_a_shard_is_a_400_naming_it_before_it_loads(
    service: Service, models: dict[str, Path]
) -> None:
    (models[NAME] / "model-00001-of-00002.safetensors").unlink()
    status, error = chat_error(
        service, InferenceEngine(EngineConfig(device="cpu"), must_not_load, size_from_files)
    )
    assert status == 400
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "model-00001-of-00002.safetensors" in error["message"]


def test_a_quantized_base_is_keyed_by_the_configured_source_and_the_snapshot(
    service: Service, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hp = {"quantization": "rtn", "bits": 4, "group_size": 128}
    before = job_base("hub-llama", hp)
    # Another host keeps its Hugging Face cache elsewhere: the same snapshot names the same base.
    write_hf_cache_entry(tmp_path / "other-hub", "acme/tiny-llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "other-hub"))
    assert job_base("hub-llama", hp) == before
    # A new revision of the model is a new base.
    write_hf_cache_entry(tmp_path / "new-hub", "acme/tiny-llama", commit="f" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "new-hub"))
    assert job_base("hub-llama", hp) != before


def test_training_on_gguf_blocks_of_a_safetensors_model_is_a_400(
    service: Service, models: dict[str, Path]
) -> None:
    response = create_job(service, NAME, quantization="gguf")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "is not a GGUF model" in error["message"]

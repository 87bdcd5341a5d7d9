"""worker/tasks/train.py before any GPU work: a job whose model folder broke after it was accepted
fails with a message naming the problem (and the worker takes the next job); a job is checked
against the memory free on the worker's device, not the card's total."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from core.config import get_settings
from core.db.models import Job
from core.db.session import session_scope
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.utils.model_folders import LLAMA_7B_CONFIG, write_sharded_model
from worker.tasks import train

GIB = 1024**3


def use_base_models(monkeypatch: pytest.MonkeyPatch, sources: dict[str, str]) -> None:
    monkeypatch.setenv("MODULORA_BASE_MODELS", json.dumps(sources))
    get_settings.cache_clear()


def create_job(service: Service, model: str) -> str:
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW], copies=10))
    body = {"model": model, "training_file": file["id"], "hyperparameters": {"quantization": "rtn"}}
    response = service.client.post("/v1/fine_tuning/jobs", headers=alice, json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def finished(job_id: str) -> Job:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        return job


def test_jobs_whose_model_folder_broke_fail_with_the_reason_and_the_worker_goes_on(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sharded = write_sharded_model(tmp_path / "sharded", shards=3)
    plain = write_sharded_model(tmp_path / "plain")
    use_base_models(monkeypatch, {"acme/llama:v1": str(sharded), "plain": str(plain)})
    missing_shard, not_a_model = create_job(service, "acme/llama:v1"), create_job(service, "plain")
    (sharded / "model-00003-of-00003.safetensors").unlink()  # e.g. a download that never finished
    (plain / "config.json").unlink()

    for job_id in (missing_shard, not_a_model):
        train.run_job(job_id, "w1")  # returns: the worker process stays up for the next job

    first, second = finished(missing_shard), finished(not_a_model)
    assert first.status == second.status == "failed"
    assert first.error["code"] == second.error["code"] == "invalid_model"
    assert first.error["param"] == "model"
    assert "missing 1 of its 3 weight shards" in first.error["message"]
    assert "model-00003-of-00003.safetensors" in first.error["message"]
    assert "is not a model folder: it has no config.json" in second.error["message"]
    assert not any(get_settings().bases_dir.glob("*")), "nothing was quantized"


@pytest.fixture
def llama_7b_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_7B_CONFIG))
    return folder


@pytest.mark.parametrize(
    ("free_gib", "budget_gib", "refused", "says"),
    [(40, 0, False, ""), (3, 0, True, "; 3.0 GiB free on cuda:0; "),
     (40, 2, True, "; 40.0 GiB free on cuda:0, budget 2.0 GiB; ")],
)  # fmt: skip
def test_a_job_is_checked_against_the_memory_free_on_the_device(
    service: Service,
    llama_7b_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    free_gib: int,
    budget_gib: int,
    refused: bool,
    says: str,
) -> None:
    # The probe: what the driver reports free now (an inference engine holds the rest of the 80 GiB).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * GIB, 80 * GIB))
    monkeypatch.setenv("MODULORA_GPU_MEMORY_BUDGET_BYTES", str(budget_gib * GIB))
    get_settings.cache_clear()
    job = finished(create_job(service, "smollm2-135m-instruct"))
    if not refused:
        train.check_memory(job, llama_7b_folder, torch.device("cuda:0"))
        return
    with pytest.raises(train.JobFailure) as failure:
        train.check_memory(job, llama_7b_folder, torch.device("cuda:0"))
    assert failure.value.error["code"] == "insufficient_memory"
    assert says in failure.value.error["message"]


def test_a_job_over_the_free_memory_fails_before_any_gpu_work_and_the_worker_goes_on(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_sharded_model(tmp_path / "llama-7b")
    use_base_models(monkeypatch, {"llama-7b": str(folder)})
    first, second = create_job(service, "llama-7b"), create_job(service, "llama-7b")
    # A worker on a GPU whose memory is mostly held by another process (the API's engine, say).
    (folder / "config.json").write_text(json.dumps(LLAMA_7B_CONFIG))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 24 * GIB))
    for job_id in (first, second):
        train.run_job(job_id, "w1")
    for job_id in (first, second):
        job = finished(job_id)
        assert job.status == "failed" and job.error["code"] == "insufficient_memory"
        assert "2.0 GiB free on cuda" in job.error["message"]
    assert not any(get_settings().bases_dir.glob("*")), "nothing was quantized"

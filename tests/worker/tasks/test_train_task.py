"""worker/tasks/train.py without a real model: out-of-memory retry, base cache keys, failure paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sqlalchemy import select

from core import lifecycle
from core.bases import base_model_source, job_base, job_quant_config
from core.config import get_settings
from core.db.models import Job, JobEvent
from core.db.session import session_scope
from modulora.lora import LoraConfig, add_lora_, lora_state_dict
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.utils.tiny_lm import tiny_llama
from worker.tasks import train


def make_job(service: Service, **hyperparameters: Any) -> Job:
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW], copies=10))
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=alice,
        json={
            "model": "smollm2-135m-instruct",
            "training_file": file["id"],
            "hyperparameters": hyperparameters,
        },
    )
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == response.json()["id"]))
        assert job is not None
        return job


def events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.pk)))


def run_with_fake_finetune(job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ooms: int) -> list[Any]:
    """Call the retry wrapper with a finetune that runs out of memory `ooms` times; returns the configs."""
    import modulora.train

    configs: list[Any] = []

    def finetune(model: Any, tokenizer: Any, examples: Any, config: Any, **_: Any) -> Any:
        configs.append(config)
        if len(configs) <= ooms:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return SimpleNamespace(status="completed", step=3, losses=[1.0], checkpoint=None)

    monkeypatch.setattr(modulora.train, "finetune", finetune)
    cpu = torch.device("cpu")
    train._finetune_with_oom_retry(job, None, None, [], None, tmp_path, cpu, None, lambda: False)
    return configs


def test_out_of_memory_retries_once_with_half_micro_batch_and_double_accumulation(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(service, batch_size=4, micro_batch_size=4)
    configs = run_with_fake_finetune(job, tmp_path, monkeypatch, ooms=1)
    assert [(c.micro_batch_size, c.gradient_accumulation) for c in configs] == [(4, 1), (2, 2)]
    warning = [e for e in events(job.id) if e.level == "warn"]
    assert warning[0].data == {"micro_batch_size": 2, "gradient_accumulation": 2}


def test_second_out_of_memory_fails_the_job_with_its_code(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(service, batch_size=4, micro_batch_size=4)
    with pytest.raises(train.JobFailure) as failure:
        run_with_fake_finetune(job, tmp_path, monkeypatch, ooms=2)
    assert failure.value.error["code"] == "out_of_memory"
    assert failure.value.error["param"] == "hyperparameters"


@pytest.mark.parametrize(("budget_gib", "layers"), [(64, 0), (0.5, 30)], ids=["roomy", "too-small"])
def test_checkpointed_layers_follow_the_budget_and_are_a_job_event(
    service: Service, budget_gib: float, layers: int
) -> None:
    # SmolLM2-135M has 30 decoder layers: 64 GiB keeps every layer's activations, and half a GiB
    # (less than the runtime overhead alone) cannot fit, so every layer recomputes.
    job = make_job(service, gradient_checkpointing=True, micro_batch_size=2, batch_size=2)
    assert train.checkpoint_layers_for_budget(job, 2, int(budget_gib * 2**30)) == layers
    event = [e for e in events(job.id) if e.message.startswith("Activation checkpointing")][-1]
    assert f"{layers} of 30 decoder layers for the {budget_gib:.1f} GiB budget" in event.message
    assert event.data["checkpoint_layers"] == layers
    assert (event.data["predicted_peak_bytes"] <= event.data["budget_bytes"]) == (layers < 30)


def test_cpu_jobs_checkpoint_every_layer(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(service, gradient_checkpointing=True, batch_size=4, micro_batch_size=4)
    configs = run_with_fake_finetune(job, tmp_path, monkeypatch, ooms=0)
    assert configs[0].gradient_checkpointing and configs[0].checkpoint_layers is None


def test_run_job_ends_failed_with_the_error_when_the_pipeline_raises(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(service)

    def broken(job_id: str, heartbeat: lifecycle.Heartbeat) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(train, "_run", broken)
    train.run_job(job.id, "w1")
    with session_scope() as session:
        failed = session.scalar(select(Job).where(Job.id == job.id))
        assert failed is not None and failed.status == "failed"
        assert failed.error == {"code": "training_error", "message": "RuntimeError: disk full", "param": None}


def test_base_cache_key_depends_on_model_and_quantization_only(service: Service) -> None:
    rtn = make_job(service, quantization="rtn", bits=4, group_size=128)
    rtn_other_run = make_job(service, quantization="rtn", bits=4, group_size=128, lora_r=4)
    three_bits = make_job(service, quantization="rtn", bits=3, group_size=128)
    native = make_job(service, quantization="gguf")
    assert rtn.seed != rtn_other_run.seed  # jobs draw their own seeds; the base does not depend on them
    rtn_base, native_base = (
        job_base(rtn.model, rtn.hyperparameters),
        job_base(native.model, native.hyperparameters),
    )
    assert rtn_base == job_base(rtn_other_run.model, rtn_other_run.hyperparameters)
    assert rtn_base != job_base(three_bits.model, three_bits.hyperparameters)
    assert Path(rtn_base).parent == get_settings().bases_dir
    assert Path(rtn_base).name.startswith("smollm2-135m-instruct-rtn-4b-g128-")
    assert native_base == "smollm2-135m-instruct:gguf"


def test_base_cache_key_follows_the_calibration_file_for_optq_only(service: Service) -> None:
    def base(job: Job) -> str:
        return job_base(job.model, job.hyperparameters, job.training_file)

    default = make_job(service, quantization="optq")
    own = make_job(service, quantization="optq", calibration="training_file")
    other_own = make_job(service, quantization="optq", calibration="training_file")
    assert own.hyperparameters["calibration"] == "training_file"
    assert len({base(default), base(own), base(other_own)}) == 3  # each training file its own base
    config = job_quant_config(own.hyperparameters, own.training_file)
    assert config is not None and config.calibration == str(get_settings().files_dir / own.training_file)
    assert job_quant_config(default.hyperparameters, default.training_file).calibration is None
    # RTN does not calibrate: its base is shared whatever the job names.
    rtn = make_job(service, quantization="rtn", calibration="training_file")
    assert base(rtn) == job_base(rtn.model, {**rtn.hyperparameters, "calibration": "default"}, None)


def test_a_deleted_calibration_file_fails_the_job_naming_the_field(service: Service) -> None:
    job = make_job(service, quantization="optq", calibration="training_file")
    (get_settings().files_dir / job.training_file).unlink()
    with pytest.raises(train.JobFailure) as failure:
        train.ensure_base(job, base_model_source(job.model))
    assert failure.value.error["param"] == "hyperparameters.calibration"


def test_adapter_starts_from_the_job_seed_as_modulora_finetune_draws_it() -> None:
    """The same seed gives the job and `modulora finetune --seed` the same initial adapter, whatever
    the process's random state was before (the e2e benchmark compares the two runs)."""
    hp = {"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": "all-linear"}
    library = tiny_llama()
    torch.manual_seed(7)
    add_lora_(library, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear"))
    for earlier_draws in (0, 1):
        job_model = tiny_llama()
        torch.rand(1 + earlier_draws)  # a different random state each time
        train._add_lora(job_model, hp, seed=7)
        job_state, library_state = lora_state_dict(job_model), lora_state_dict(library)
        assert job_state.keys() == library_state.keys()
        for key, value in job_state.items():
            torch.testing.assert_close(value, library_state[key], rtol=0, atol=0)

"""/v1/fine_tuning/jobs without a worker: creation, "auto" resolution, idempotency, paging,
cancel, events, tenancy, and the memory check."""

from __future__ import annotations

import pytest

from core.db.events import record_event
from core.db.models import Job
from core.db.session import session_scope
from tests.api.conftest import CHAT_ROW, Service, jsonl


def create(service: Service, headers: dict[str, str], training_file: str, **body: object) -> dict:
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "smollm2-135m-instruct", "training_file": training_file, **body},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_create_job_resolves_auto_and_enqueues(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    job = create(
        service,
        alice,
        training_file,
        suffix="demo",
        seed=7,
        hyperparameters={"n_epochs": 2, "quantization": "rtn", "lora_r": 8},
    )
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["seed"] == 7
    hp = job["hyperparameters"]
    assert hp["n_epochs"] == 2 and hp["batch_size"] == 2 and hp["learning_rate_multiplier"] == 1.0
    assert hp["quantization"] == "rtn" and hp["lora_r"] == 8 and hp["max_seq_len"] == 512
    assert job["method"]["supervised"]["hyperparameters"] == hp
    assert service.enqueued == [job["id"]]


def test_create_job_echoes_integrations_and_the_schedule(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    wandb = {"project": "demo", "tags": ["a"]}
    job = create(service, alice, training_file, integrations=[{"type": "wandb", "wandb": wandb}],
                 hyperparameters={"schedule": "linear", "packing": True})  # fmt: skip
    assert job["integrations"] == [{"type": "wandb", "wandb": wandb}] and job["result_files"] == []
    hp = job["hyperparameters"]
    schedule = (hp["schedule"], hp["warmup_ratio"], hp["weight_decay"], hp["packing"])
    assert schedule == ("linear", 0.03, 0.0, True)
    retrieved = service.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=alice).json()
    assert retrieved["integrations"] == job["integrations"]


def test_create_job_with_same_idempotency_key_returns_first_job(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    headers = {**alice, "Idempotency-Key": "retry-1"}
    first, second = create(service, headers, training_file), create(service, headers, training_file)
    assert first["id"] == second["id"] and service.enqueued == [first["id"]]
    assert create(service, {**alice, "Idempotency-Key": "retry-2"}, training_file)["id"] != first["id"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-5"}, "model"),
        ({"hyperparameters": {"quantization": "awq"}}, "hyperparameters.quantization"),
        ({"hyperparameters": {"bits": 5}}, "hyperparameters.bits"),
        ({"hyperparameters": {"batch_size": 4, "micro_batch_size": 3}}, "hyperparameters"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"hyperparameters": {"schedule": "step"}}, "hyperparameters.schedule"),
        ({"hyperparameters": {"warmup_ratio": 1}}, "hyperparameters.warmup_ratio"),
        ({"integrations": [{"type": "mlflow", "mlflow": {}}]}, "integrations.0.type"),
        ({"integrations": [{"type": "wandb", "wandb": {"name": "x"}}]}, "integrations.0.wandb.project"),
        ({"hyperparameters": {"keep_checkpoints": 0}}, "hyperparameters.keep_checkpoints"),
        ({"hyperparameters": {"eval_every": -2}}, "hyperparameters.eval_every"),
    ],
)
def test_create_job_with_bad_parameter_is_400_naming_it(
    service: Service, alice: dict[str, str], training_file: str, body: dict, param: str
) -> None:
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=alice,
        json={"model": "smollm2-135m-instruct", "training_file": training_file, **body},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert service.enqueued == []


def test_create_job_on_another_users_file_is_404(service: Service, training_file: str) -> None:
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=service.new_key("bob"),
        json={"model": "smollm2-135m-instruct", "training_file": training_file},
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "training_file"


def test_calibration_names_a_stored_file_of_the_user(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    own = create(service, alice, training_file, hyperparameters={"calibration": "training_file"})
    assert own["hyperparameters"]["calibration"] == "training_file"
    other = service.upload(alice, jsonl([CHAT_ROW], copies=5))["id"]
    assert (
        create(service, alice, training_file, hyperparameters={"calibration": other})["hyperparameters"][
            "calibration"
        ]
        == other
    )
    bobs = service.upload(service.new_key("bob"), jsonl([CHAT_ROW], copies=5))["id"]
    for unknown in ("file-does-not-exist", bobs):  # another user's file reads as a missing one
        response = service.client.post(
            "/v1/fine_tuning/jobs",
            headers=alice,
            json={"model": "smollm2-135m-instruct", "training_file": training_file,
                  "hyperparameters": {"calibration": unknown}},
        )  # fmt: skip
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "hyperparameters.calibration"
        assert unknown in response.json()["error"]["message"]


def test_list_jobs_pages_newest_first_and_filters_metadata(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    ids = [create(service, alice, training_file, metadata={"run": str(i % 2)})["id"] for i in range(3)]
    page = service.client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=alice).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    rest = service.client.get("/v1/fine_tuning/jobs", params={"after": ids[1]}, headers=alice).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    zeros = service.client.get("/v1/fine_tuning/jobs", params={"metadata[run]": "0"}, headers=alice).json()
    assert [j["id"] for j in zeros["data"]] == [ids[2], ids[0]]
    assert service.client.get("/v1/fine_tuning/jobs", headers=service.new_key("bob")).json()["data"] == []


def test_cancel_queued_job_ends_it_at_once(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    job = create(service, alice, training_file)
    cancelled = service.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None


def test_cancel_running_job_sets_the_flag_the_worker_reads(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    job = create(service, alice, training_file)
    with session_scope() as session:
        session.query(Job).filter(Job.id == job["id"]).update({"status": "running"})
    response = service.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice).json()
    assert response["status"] == "running"
    with session_scope() as session:
        assert session.query(Job).filter(Job.id == job["id"]).one().cancel_requested is True


def test_events_page_newest_first_with_metrics_data(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    job = create(service, alice, training_file)
    with session_scope() as session:
        for step in (1, 2, 2):  # the repeated step is dropped: events are unique per (job, step)
            record_event(session, job["id"], f"step {step}", type="metrics", step=step, data={"step": step})
    events = service.client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 2}, headers=alice
    ).json()
    assert [e["data"] for e in events["data"]] == [{"step": 2}, {"step": 1}] and events["has_more"] is True
    rest = service.client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": events["data"][-1]["id"]}, headers=alice
    ).json()
    assert [e["message"] for e in rest["data"]] == [f"Created fine-tuning job: {job['id']}"]


def test_other_users_job_is_404_everywhere(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    job = create(service, alice, training_file)
    bob = service.new_key("bob")
    for method, suffix in (
        ("get", ""),
        ("post", "/cancel"),
        ("get", "/events"),
        ("get", "/checkpoints"),
        ("get", "/metrics/stream"),
    ):
        response = service.client.request(method, f"/v1/fine_tuning/jobs/{job['id']}{suffix}", headers=bob)
        assert response.status_code == 404, suffix


def test_create_job_over_memory_budget_is_400_saying_what_fits(
    service: Service, alice: dict[str, str], training_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from core.config import get_settings

    config = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "num_attention_heads": 32,
    }  # LLaMA-7B
    folder = service.home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(get_settings(), "gpu_memory_budget_bytes", 10 * 1024**3)
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=alice,
        json={
            "model": "smollm2-135m-instruct",
            "training_file": training_file,
            "hyperparameters": {"batch_size": 8, "micro_batch_size": 8, "max_seq_len": 512},
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["code"] == "insufficient_memory"
        and "micro_batch_size=1 at max_seq_len=512 fits" in error["message"]
    )


def test_create_job_rejects_bits_the_method_does_not_support() -> None:
    from pydantic import ValidationError

    from api.schemas import Hyperparameters

    with pytest.raises(ValidationError, match="bits: quip# supports \\[2\\], not 4"):
        Hyperparameters(quantization="quip#", bits=4)
    assert Hyperparameters(quantization="quip#", bits=2).bits == 2


def test_validation_runs_at_every_checkpoint_and_three_checkpoints_are_kept_unless_told(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    hp = create(service, alice, training_file)["hyperparameters"]  # 3 epochs of 10 steps
    assert (hp["checkpoint_every"], hp["eval_every"], hp["keep_checkpoints"]) == (3, 3, 3)
    told = {"eval_every": 5, "keep_checkpoints": 1}
    hp = create(service, alice, training_file, hyperparameters=told)["hyperparameters"]
    assert (hp["eval_every"], hp["keep_checkpoints"]) == (5, 1)

"""DELETE of files, fine-tuned models and finished jobs: what goes, what stays, whose it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.config import get_settings
from core.db.events import record_event
from core.db.models import Checkpoint, Job, JobEvent, Model
from core.db.session import session_scope
from tests.api.conftest import CHAT_ROW, Service, jsonl

BASE = "smollm2-135m-instruct"


def _create_job(service: Service, headers: dict[str, str], file_id: str) -> str:
    response = service.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": BASE, "training_file": file_id}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _finish_with_artifacts(job_id: str, status: str = "succeeded") -> tuple[str, list[Path]]:
    """End the job as a worker would: a checkpoint folder, an adapter folder, a model row, events."""
    settings = get_settings()
    checkpoint = settings.jobs_dir / job_id / "checkpoints" / "step-2"
    adapter = settings.adapters_dir / job_id
    for folder in (checkpoint, adapter):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        job.status = status
        name = job.fine_tuned_model_name()
        session.add(Checkpoint(job_id=job_id, step=2, path=str(checkpoint.relative_to(settings.home))))
        session.add(
            Model(
                id=name,
                user_id=job.user_id,
                job_id=job_id,
                parent=BASE,
                base=f"{BASE}:gguf",
                path=str(adapter.relative_to(settings.home)),
            )
        )
        job.fine_tuned_model = name
        session.commit()
        record_event(session, job_id, "step 1", type="metrics", step=1, data={"step": 1, "train_loss": 2.0})
    return name, [settings.jobs_dir / job_id, adapter]


def _count(table: type, **where: str) -> int:
    with session_scope() as session:
        stmt = select(func.count()).select_from(table)
        for column, value in where.items():
            stmt = stmt.where(getattr(table, column) == value)
        return session.scalar(stmt) or 0


def test_delete_finished_job_removes_events_checkpoints_model_and_their_files(
    service: Service, alice: dict[str, str]
) -> None:
    file_id = service.upload(alice, jsonl([CHAT_ROW], copies=10))["id"]
    job_id = _create_job(service, alice, file_id)
    model, folders = _finish_with_artifacts(job_id)

    response = service.client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=alice)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
    assert service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice).status_code == 404
    assert service.client.get(f"/v1/models/{model}", headers=alice).status_code == 404
    for table in (JobEvent, Checkpoint, Model):
        assert _count(table, job_id=job_id) == 0, table.__name__
    assert [f for f in folders if f.exists()] == []
    # The training file is the user's own object: it stays.
    assert service.client.get(f"/v1/files/{file_id}", headers=alice).status_code == 200


@pytest.mark.parametrize("status", ["queued", "running"])
def test_delete_unfinished_job_is_409_and_keeps_it(
    service: Service, alice: dict[str, str], status: str
) -> None:
    job_id = _create_job(service, alice, service.upload(alice, jsonl([CHAT_ROW], copies=10))["id"])
    with session_scope() as session:
        session.scalar(select(Job).where(Job.id == job_id)).status = status  # type: ignore[union-attr]
    response = service.client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=alice)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_finished"
    assert status in response.json()["error"]["message"]
    assert service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice).json()["status"] == status


def test_nothing_of_another_user_can_be_deleted(service: Service, alice: dict[str, str]) -> None:
    file_id = service.upload(alice, jsonl([CHAT_ROW], copies=10))["id"]
    job_id = _create_job(service, alice, file_id)
    model, folders = _finish_with_artifacts(job_id, status="cancelled")
    bob = service.new_key("bob")
    for path, code in (
        (f"/v1/fine_tuning/jobs/{job_id}", "job_not_found"),
        (f"/v1/models/{model}", "model_not_found"),
        (f"/v1/files/{file_id}", "file_not_found"),
    ):
        response = service.client.delete(path, headers=bob)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == code
    assert all(f.exists() for f in folders)
    assert service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice).status_code == 200
    assert service.client.get(f"/v1/models/{model}", headers=alice).status_code == 200
    assert service.client.get(f"/v1/files/{file_id}", headers=alice).status_code == 200


def test_delete_model_removes_its_adapter_but_keeps_the_job(service: Service, alice: dict[str, str]) -> None:
    job_id = _create_job(service, alice, service.upload(alice, jsonl([CHAT_ROW], copies=10))["id"])
    model, (job_folder, adapter) = _finish_with_artifacts(job_id)
    response = service.client.delete(f"/v1/models/{model}", headers=alice)
    assert response.json() == {"id": model, "object": "model", "deleted": True}
    assert not adapter.exists() and job_folder.exists()
    assert [m["id"] for m in service.client.get("/v1/models", headers=alice).json()["data"]] == [BASE]
    assert service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice).status_code == 200


def test_a_base_model_cannot_be_deleted(service: Service, alice: dict[str, str]) -> None:
    response = service.client.delete(f"/v1/models/{BASE}", headers=alice)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_deletable"
    assert BASE in [m["id"] for m in service.client.get("/v1/models", headers=alice).json()["data"]]


def test_delete_file_of_a_running_job_is_409(service: Service, alice: dict[str, str]) -> None:
    file_id = service.upload(alice, jsonl([CHAT_ROW], copies=10))["id"]
    job_id = _create_job(service, alice, file_id)
    response = service.client.delete(f"/v1/files/{file_id}", headers=alice)
    assert response.status_code == 409 and response.json()["error"]["code"] == "file_in_use"
    assert job_id in response.json()["error"]["message"]

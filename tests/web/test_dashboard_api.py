"""The /v1/dashboard routes the browser uses, through FastAPI's TestClient on an isolated home.

The home holds only SmolLM2's config and tokenizer files (copied from the shared test home), which
is all these torch-free routes read. The fresh-server tests start from an empty home and stand in
a file copy for the GGUF conversion (the browser tests run the real one).
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import crud
from api.main import create_app
from api.routes import dashboard
from core.config import get_settings
from core.db import migrate
from core.db import session as db_session
from core.db.events import record_event
from core.db.models import Checkpoint, Job, Model
from core.db.session import session_scope
from modulora.settings import get_settings as library_settings

BASE_MODEL = "smollm2-135m-instruct"
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
ROW = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
LONG_ROW = {
    "messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one " * 200}]
}


def _clear_caches() -> None:
    get_settings.cache_clear()
    library_settings.cache_clear()
    db_session.get_db_engine.cache_clear()
    db_session._sessionmaker.cache_clear()


@pytest.fixture(scope="session")
def model_folder() -> Path:
    from modulora.models import resolve_model  # converts the GGUF once into the shared test home

    return resolve_model(BASE_MODEL)


def _copy_model_files(model_folder: Path, target: Path) -> None:
    """What a conversion leaves, written as it writes it: under a temporary name, then renamed (a
    folder filled in place is "prepared" at its config.json, before its tokenizer is there)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model_folder / name).is_file():
            shutil.copy(model_folder / name, tmp / name)
    tmp.rename(target)


def _service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("MODULORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODULORA_DATABASE_URL", f"sqlite:///{tmp_path / 'modulora.db'}")
    for name in ("MODULORA_REDIS_URL", "REDIS_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    _clear_caches()
    migrate.upgrade()
    with TestClient(create_app()) as test_client:
        yield test_client
    _clear_caches()


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_folder: Path) -> Iterator[TestClient]:
    _copy_model_files(model_folder, tmp_path / "home" / "models" / BASE_MODEL)
    yield from _service(tmp_path, monkeypatch)


@pytest.fixture
def fresh_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A server whose home has never seen the base model (nothing converted yet)."""
    yield from _service(tmp_path, monkeypatch)


def _key(user: str) -> dict[str, str]:
    with session_scope() as session:
        return {"Authorization": f"Bearer {crud.create_api_key(session=session, user_name=user)}"}


def _upload(client: TestClient, headers: dict[str, str], rows: list[dict]) -> dict:
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = client.post(
        "/v1/files", headers=headers, files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def _estimate(client: TestClient, headers: dict[str, str], gpu: str, **hyperparameters: object) -> dict:
    body = {
        "model": BASE_MODEL,
        "training_file": "",
        "metadata": {"gpu": gpu},
        "hyperparameters": {"quantization": "rtn", "bits": 4, **hyperparameters},
    }
    response = client.post("/v1/dashboard/memory_estimate", headers=headers, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_options_need_a_key_and_list_methods_bits_and_gpus(client: TestClient) -> None:
    assert client.get("/v1/dashboard/options").status_code == 401
    options = client.get("/v1/dashboard/options", headers=_key("ann")).json()
    assert options["base_models"] == [BASE_MODEL]
    methods = {m["name"]: m["bits"] for m in options["quantization_methods"]}
    assert methods["nf4"] == [4] and 2 in methods["rtn"]
    assert "24GB" in [g["name"] for g in options["gpus"]]


def test_memory_estimate_fits_a_small_job_and_flags_a_huge_one_with_advice(client: TestClient) -> None:
    headers = _key("ann")
    small = _estimate(client, headers, "24GB", max_seq_len=512, batch_size=4, micro_batch_size=4)
    assert small["fits"] and small["advice"] is None
    assert small["peak_bytes"] == sum(small["breakdown"].values())
    huge = _estimate(client, headers, "16GB", max_seq_len=32768, batch_size=8, micro_batch_size=8)
    assert not huge["fits"] and huge["peak_bytes"] > 16 * 10**9
    assert "would fit" in huge["advice"]


def test_memory_estimate_rejects_an_unknown_gpu_naming_the_allowed_ones(client: TestClient) -> None:
    body = {"model": BASE_MODEL, "training_file": "", "metadata": {"gpu": "3GB"}}
    response = client.post("/v1/dashboard/memory_estimate", headers=_key("ann"), json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata.gpu"
    assert "24GB" in response.json()["error"]["message"]


def test_report_counts_rows_over_the_chosen_length(client: TestClient) -> None:
    headers = _key("ann")
    file = _upload(client, headers, [ROW] * 9 + [LONG_ROW])
    report = client.get(
        f"/v1/dashboard/files/{file['id']}/report", headers=headers, params={"max_seq_len": 128}
    ).json()
    assert (report["format"], report["rows"], report["errors"]) == ("messages", 10, [])
    assert report["truncated"] == 1 and report["max_seq_len"] == 128
    assert sum(b["count"] for b in report["histogram"]) == 10
    assert report["tokens"]["max"] > 200


def test_preview_marks_only_the_assistant_turn_as_trained(client: TestClient) -> None:
    headers = _key("ann")
    file = _upload(client, headers, [ROW, ROW])
    preview = client.get(
        f"/v1/dashboard/files/{file['id']}/preview", headers=headers, params={"rows": 1}
    ).json()
    (row,) = preview["rows"]
    trained = "".join(s["text"] for s in row["segments"] if s["trained"])
    prompt = "".join(s["text"] for s in row["segments"] if not s["trained"])
    assert trained.startswith("Blue.") and "Name a colour." in prompt and "<|im_start|>user" in prompt
    assert 0 < row["trained_tokens"] < row["tokens"]


def test_preview_of_another_users_file_is_404(client: TestClient) -> None:
    file = _upload(client, _key("ann"), [ROW])
    response = client.get(f"/v1/dashboard/files/{file['id']}/preview", headers=_key("bob"))
    assert response.status_code == 404


def _job(user_headers: dict[str, str], client: TestClient, file_id: str) -> str:
    response = client.post(
        "/v1/fine_tuning/jobs", headers=user_headers, json={"model": BASE_MODEL, "training_file": file_id}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _queued_job(client: TestClient, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str]) -> str:
    """A job on 10 rows that no worker picks up (the tests write its events themselves)."""
    from core import tasks

    monkeypatch.setattr(tasks, "enqueue_training", lambda job_id: None)
    return _job(headers, client, _upload(client, headers, [ROW] * 10)["id"])


def test_jobs_progress_reports_the_latest_step(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = _key("ann")
    job_id = _queued_job(client, monkeypatch, headers)
    with session_scope() as session:
        for step in (1, 2):
            record_event(
                session,
                job_id,
                f"step {step}",
                type="metrics",
                step=step,
                data={"step": step, "total_steps": 4, "progress": step / 4, "eta_s": 10.0 * (4 - step)},
            )
    progress = client.get("/v1/dashboard/jobs/progress", headers=headers).json()["data"]
    assert progress == [{"id": job_id, "step": 2, "total_steps": 4, "progress": 0.5, "eta_s": 20.0}]
    assert client.get("/v1/dashboard/jobs/progress", headers=_key("bob")).json()["data"] == []


def test_downloads_zip_the_adapter_and_checkpoint_folders(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = _key("ann")
    job_id = _queued_job(client, monkeypatch, headers)
    home = get_settings().home
    for folder in ("adapters/a1", "jobs/j1/checkpoints/step-2"):
        (home / folder).mkdir(parents=True)
        (home / folder / "adapter_config.json").write_text("{}")
    with session_scope() as session:
        user_id = session.get(Job, 1).user_id
        session.add(
            Model(
                id="ft:smollm2:web",
                user_id=user_id,
                job_id=job_id,
                parent=BASE_MODEL,
                base=BASE_MODEL,
                path="adapters/a1",
            )
        )
        session.add(
            Checkpoint(id="ftckpt-1", job_id=job_id, step=2, path=str(home / "jobs/j1/checkpoints/step-2"))
        )
        session.add(Checkpoint(id="ftckpt-2", job_id=job_id, step=3, path="/etc"))

    response = client.get("/v1/dashboard/models/ft:smollm2:web/download", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(response.content)).namelist() == ["ft_smollm2_web/adapter_config.json"]
    response = client.get("/v1/dashboard/checkpoints/ftckpt-1/download", headers=headers)
    assert zipfile.ZipFile(io.BytesIO(response.content)).namelist() == ["ftckpt-1/adapter_config.json"]
    with session_scope() as session:
        public = f"{session.get(Job, 1).fine_tuned_model_name()}:ckpt-step-2"
    by_name = client.get(f"/v1/dashboard/checkpoints/{public}/download", headers=headers)
    assert by_name.status_code == 200 and by_name.content == response.content
    assert client.get("/v1/dashboard/checkpoints", headers=headers).json()["data"][0]["id"] == "ftckpt-2"
    # Never a folder outside the storage root, never another user's artifact.
    assert client.get("/v1/dashboard/checkpoints/ftckpt-2/download", headers=headers).status_code == 410
    assert client.get("/v1/dashboard/checkpoints/ftckpt-1/download", headers=_key("bob")).status_code == 404


def _wait_until_prepared(client: TestClient, path: str, headers: dict[str, str]) -> dict:
    """GET a route until the model it needs is prepared: 503 `model_preparing` meanwhile."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = client.get(path, headers=headers)
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return response.json()
        assert response.json()["error"]["code"] == "model_preparing"
        assert response.json()["error"]["param"] == "model"
        time.sleep(0.05)
    raise TimeoutError(path)


def test_fresh_server_prepares_the_base_model_on_first_use_for_report_and_estimate(
    fresh_client: TestClient, model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    calls: list[str] = []

    def prepare(model: str) -> Path:
        calls.append(model)
        release.wait(10)
        _copy_model_files(model_folder, get_settings().models_dir / model)
        return get_settings().models_dir / model

    monkeypatch.setattr(dashboard, "_prepare", prepare)
    monkeypatch.setattr(dashboard, "_preparing", {})
    headers = _key("ann")
    file = _upload(fresh_client, headers, [ROW] * 4)
    report_path = f"/v1/dashboard/files/{file['id']}/report"
    # While the conversion runs, every route that needs the model says so, and none starts a second one.
    for _ in range(3):
        response = fresh_client.get(report_path, headers=headers)
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_preparing"
    body = {"model": BASE_MODEL, "training_file": file["id"], "hyperparameters": {"quantization": "rtn"}}
    assert fresh_client.post("/v1/dashboard/memory_estimate", headers=headers, json=body).status_code == 503
    release.set()
    report = _wait_until_prepared(fresh_client, report_path, headers)
    assert calls == [BASE_MODEL]
    assert report["tokenizer"] == BASE_MODEL and report["tokens"]["min"] > 0
    assert sum(b["count"] for b in report["histogram"]) == 4
    preview = fresh_client.get(f"/v1/dashboard/files/{file['id']}/preview", headers=headers).json()
    assert len(preview["rows"]) == 3
    estimate = fresh_client.post("/v1/dashboard/memory_estimate", headers=headers, json=body).json()
    assert estimate["fits"] and estimate["time"]["steps"] > 0


def test_a_failed_preparation_is_reported_once_and_then_retried(
    fresh_client: TestClient, model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def prepare(model: str) -> Path:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk full")
        _copy_model_files(model_folder, get_settings().models_dir / model)
        return get_settings().models_dir / model

    monkeypatch.setattr(dashboard, "_prepare", prepare)
    monkeypatch.setattr(dashboard, "_preparing", {})
    headers = _key("ann")
    path = f"/v1/dashboard/files/{_upload(fresh_client, headers, [ROW])['id']}/report"
    deadline = time.monotonic() + 10
    while (response := fresh_client.get(path, headers=headers)).status_code == 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "model_prepare_failed"
    assert "disk full" in response.json()["error"]["message"]
    report = _wait_until_prepared(fresh_client, path, headers)
    assert len(attempts) == 2 and report["tokens"] is not None


@pytest.fixture
def gguf_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A base model "mine" whose source is a folder holding a .gguf (no config.json beside it)."""
    source = tmp_path / "my-gguf"
    source.mkdir()
    (source / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("MODULORA_BASE_MODELS", json.dumps({"mine": str(source)}))
    return source


def test_a_gguf_source_is_prepared_once_into_its_converted_folder(
    gguf_source: Path, fresh_client: TestClient, model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its config and tokenizer appear in a converted folder under the home, which later requests use."""
    calls: list[str] = []

    def prepare(model: str) -> Path:
        calls.append(model)
        converted = get_settings().models_dir / "model-0123456789ab"  # as `resolve_model` names it
        _copy_model_files(model_folder, converted)
        return converted

    monkeypatch.setattr(dashboard, "_prepare", prepare)
    monkeypatch.setattr(dashboard, "_preparing", {})
    monkeypatch.setattr(dashboard, "_converted", {})
    headers = _key("ann")
    path = f"/v1/dashboard/files/{_upload(fresh_client, headers, [ROW])['id']}/report?model=mine"
    report = _wait_until_prepared(fresh_client, path, headers)
    assert report["tokenizer"] == "mine" and report["tokens"]["min"] > 0
    assert fresh_client.get(path, headers=headers).status_code == 200
    assert calls == ["mine"]


def test_options_expose_the_base_learning_rate_the_worker_trains_with(client: TestClient) -> None:
    from api.schemas import Hyperparameters
    from core.config import BASE_LEARNING_RATE

    options = client.get("/v1/dashboard/options", headers=_key("ann")).json()
    assert options["base_learning_rate"] == BASE_LEARNING_RATE
    # The form starts from the API's own defaults (which the CLI shares).
    api_defaults = Hyperparameters().resolve(train_rows=100)
    shared = options["training_defaults"]
    assert {k: api_defaults[k] for k in shared if k != "learning_rate"} == {
        k: v for k, v in shared.items() if k != "learning_rate"
    }
    assert shared["learning_rate"] == BASE_LEARNING_RATE


def test_time_estimate_scales_with_steps_and_the_card(client: TestClient) -> None:
    headers = _key("ann")
    file = _upload(client, headers, [ROW] * 40)
    body = {
        "model": BASE_MODEL,
        "training_file": file["id"],
        "hyperparameters": {"quantization": "rtn", "batch_size": 4, "micro_batch_size": 4, "n_epochs": 1},
    }
    small_card = client.post(
        "/v1/dashboard/memory_estimate", headers=headers, json={**body, "metadata": {"gpu": "16GB"}}
    ).json()["time"]
    assert small_card["steps"] == 10
    assert small_card["total_seconds"] == pytest.approx(10 * small_card["step_seconds"])
    assert "10 steps" in small_card["basis"]
    body["hyperparameters"]["n_epochs"] = 3
    three_epochs = client.post(
        "/v1/dashboard/memory_estimate", headers=headers, json={**body, "metadata": {"gpu": "16GB"}}
    ).json()["time"]
    assert three_epochs["steps"] == 30
    assert three_epochs["total_seconds"] == pytest.approx(3 * small_card["total_seconds"])
    h200 = client.post(
        "/v1/dashboard/memory_estimate", headers=headers, json={**body, "metadata": {"gpu": "141GB"}}
    ).json()["time"]
    assert h200["step_seconds"] < three_epochs["step_seconds"]


def test_job_loss_messages_and_checkpoints_for_the_job_page(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = _key("ann")
    job_id = _queued_job(client, monkeypatch, headers)
    with session_scope() as session:
        record_event(session, job_id, "Quantizing", data={"phase": "quantizing", "done": 3, "total": 30})
        for step, loss in ((1, 2.5), (2, 2.0)):
            data = {"step": step, "train_loss": loss} | ({"valid_loss": 2.2} if step == 2 else {})
            record_event(session, job_id, f"step {step}", type="metrics", step=step, data=data)
        record_event(session, job_id, "Done")
        session.add(
            Checkpoint(id="ftckpt-9", job_id=job_id, step=2, path="jobs/x", metrics={"train_loss": 2.0})
        )

    loss = client.get(f"/v1/dashboard/jobs/{job_id}/loss", headers=headers).json()
    assert loss == {"job_id": job_id, "step": [1, 2], "train_loss": [2.5, 2.0], "valid_loss": [None, 2.2]}
    messages = client.get(f"/v1/dashboard/jobs/{job_id}/messages", headers=headers).json()["data"]
    texts = [m["message"] for m in messages]
    assert texts[-2:] == ["Quantizing", "Done"] and not any(t.startswith("step") for t in texts)
    assert messages[-2]["data"] == {"phase": "quantizing", "done": 3, "total": 30}
    newer = client.get(
        f"/v1/dashboard/jobs/{job_id}/messages", headers=headers, params={"after": messages[-2]["n"]}
    ).json()["data"]
    assert [m["message"] for m in newer] == ["Done"]
    (checkpoint,) = client.get("/v1/dashboard/checkpoints", headers=headers).json()["data"]
    assert checkpoint == {
        "id": "ftckpt-9",
        "job_id": job_id,
        "step": 2,
        "model": BASE_MODEL,
        "suffix": None,
        "job_status": "queued",
        "metrics": {"train_loss": 2.0},
    }
    for path in ("loss", "messages"):
        assert client.get(f"/v1/dashboard/jobs/{job_id}/{path}", headers=_key("bob")).status_code == 404

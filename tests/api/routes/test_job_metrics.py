"""GET .../metrics/stream: SSE with ids, Last-Event-ID replay, heartbeats, close at the end."""

from __future__ import annotations

import json
import threading
import time

from core.db.events import record_event
from core.db.models import Job
from core.db.session import session_scope
from core.phases import record_phase
from tests.api.conftest import CHAT_ROW, Service, jsonl


def new_job(service: Service, headers: dict[str, str]) -> str:
    file = service.upload(headers, jsonl([CHAT_ROW], copies=10))
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "smollm2-135m-instruct", "training_file": file["id"]},
    )
    return response.json()["id"]


def add_steps(job_id: str, steps: range) -> None:
    with session_scope() as session:
        for step in steps:
            record_event(
                session,
                job_id,
                f"step {step}",
                type="metrics",
                step=step,
                data={"step": step, "train_loss": 1.0 / step},
            )


def set_status(job_id: str, status: str) -> None:
    with session_scope() as session:
        session.query(Job).filter(Job.id == job_id).update({"status": status})


def read_stream(service: Service, headers: dict[str, str], job_id: str) -> list[dict]:
    """Parsed SSE messages: {"id", "event", "data"} per message, "comment" for heartbeats."""
    messages, current = [], {}
    with service.client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/metrics/stream", headers=headers
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        for line in response.iter_lines():
            if line.startswith(":"):
                messages.append({"comment": line[1:].strip()})
            elif line == "":
                if current:
                    messages.append(current)
                current = {}
            else:
                key, _, value = line.partition(": ")
                current[key] = json.loads(value) if key == "data" else value
    return messages


def test_stream_replays_after_last_event_id_and_closes_on_final_status(service: Service) -> None:
    alice = service.new_key("alice")
    job_id = new_job(service, alice)
    add_steps(job_id, range(1, 4))
    set_status(job_id, "succeeded")
    everything = [m for m in read_stream(service, alice, job_id) if m.get("event") == "metrics"]
    assert [m["data"]["step"] for m in everything] == [1, 2, 3]
    resumed = read_stream(service, {**alice, "Last-Event-ID": everything[1]["id"]}, job_id)
    assert [m["data"]["step"] for m in resumed if m.get("event") == "metrics"] == [3]
    assert resumed[-1] == {"event": "done", "data": {"status": "succeeded"}}


def test_stream_follows_live_steps_with_heartbeats(service: Service) -> None:
    alice = service.new_key("alice")
    job_id = new_job(service, alice)
    set_status(job_id, "running")

    def train() -> None:
        for step in (1, 2):
            time.sleep(0.5)  # longer than the 0.2 s heartbeat the fixture sets
            add_steps(job_id, range(step, step + 1))
        set_status(job_id, "cancelled")

    trainer = threading.Thread(target=train)
    trainer.start()
    messages = read_stream(service, alice, job_id)
    trainer.join()
    assert [m["data"]["step"] for m in messages if m.get("event") == "metrics"] == [1, 2]
    assert {"comment": "heartbeat"} in messages
    assert messages[-1]["data"] == {"status": "cancelled"}


def test_stream_carries_phases_in_order_with_the_steps_and_replays_them(service: Service) -> None:
    alice = service.new_key("alice")
    job_id = new_job(service, alice)  # creation reports `queued`
    set_status(job_id, "running")
    with session_scope() as session:
        record_phase(session, job_id, "quantizing", "Quantizing layer 3 of 30", done=3, total=30,
                     unit="layer", eta_s=41.5)  # fmt: skip
        record_event(session, job_id, "A log line without a phase")
        record_phase(session, job_id, "training", "Training: 2 steps", done=0, total=2, unit="step")
    add_steps(job_id, range(1, 3))
    set_status(job_id, "succeeded")

    messages = [m for m in read_stream(service, alice, job_id) if "event" in m]
    kinds = [(m["event"], m["data"].get("phase", m["data"].get("step"))) for m in messages]
    assert kinds == [("phase", "queued"), ("phase", "quantizing"), ("phase", "training"),
                     ("metrics", 1), ("metrics", 2), ("done", None)]  # fmt: skip
    quantizing = messages[1]["data"]
    assert {k: quantizing[k] for k in ("done", "total", "unit", "eta_s")} == {
        "done": 3, "total": 30, "unit": "layer", "eta_s": 41.5}  # fmt: skip
    resumed = read_stream(service, {**alice, "Last-Event-ID": messages[1]["id"]}, job_id)
    assert [m["event"] for m in resumed if "event" in m] == ["phase", "metrics", "metrics", "done"]


def test_the_job_object_says_its_phase_while_it_runs(service: Service) -> None:
    alice = service.new_key("alice")
    job_id = new_job(service, alice)

    def phase() -> dict | None:
        return service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice).json()["phase"]

    assert phase()["phase"] == "queued"
    set_status(job_id, "running")
    with session_scope() as session:
        record_phase(
            session, job_id, "quantizing", "Quantizing layer 7 of 30", done=7, total=30, unit="layer"
        )
    assert (phase()["phase"], phase()["done"], phase()["total"]) == ("quantizing", 7, 30)
    with session_scope() as session:
        record_phase(session, job_id, "training", "Training: 4 steps", done=0, total=4, unit="step")
    add_steps(job_id, range(1, 3))  # the training phase's progress is the latest step's
    assert (phase()["phase"], phase()["done"]) == ("training", 2)
    listed = service.client.get("/v1/fine_tuning/jobs", headers=alice).json()["data"][0]
    assert listed["phase"]["phase"] == "training"
    set_status(job_id, "succeeded")
    assert phase() is None

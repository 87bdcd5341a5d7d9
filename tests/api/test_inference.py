"""/v1/chat/completions and /v1/completions: over a scripted `EngineClient` (what the API translates),
then over the real engine (tiny quantized model, per-user adapters)."""

from __future__ import annotations

import copy
import io
import json
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from api.inference.service import get_inference_engine
from core.config import get_settings
from core.db.models import Checkpoint, Job, Model, User
from core.db.session import session_scope
from modulora.checkpoint import trainable_parameters
from modulora.models import load_tokenizer
from modulora.serve.engine import InferenceEngine
from modulora.serve.events import DoneEvent, ErrorEvent, FinishEvent, GenerationEvent, TextEvent
from modulora.serve.types import EngineConfig, EngineError, ModelSpec, SamplingParams
from tests.api.conftest import Service
from tests.api.engines import FakeEngine, held_engine, scripted_engine
from tests.modulora.serve.factories import export_random_adapter, random_adapter, tiny_quantized_llama

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path, Any]:
    """(tiny quantized base, tokenizer, a PEFT adapter folder of it, the base with that adapter)."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    base = tiny_quantized_llama(len(tokenizer))
    adapted = copy.deepcopy(base)
    random_adapter(adapted, seed=5)
    return (
        base,
        tokenizer,
        export_random_adapter(adapted, tmp_path_factory.mktemp("adapter"), 4, tokenizer),
        adapted,
    )


TWO_CHOICES = [TextEvent(0, "Hel"), TextEvent(1, "Bon"), TextEvent(0, "lo"), FinishEvent(1, "stop"),
               FinishEvent(0, "length"), DoneEvent(prompt_tokens=7, completion_tokens=5)]  # fmt: skip


@pytest.fixture
def scripted(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> Callable[[list[GenerationEvent]], FakeEngine]:
    """Serve base `tiny` from a scripted engine with the given events."""
    monkeypatch.setenv("MODULORA_BASE_MODELS", '["tiny"]')
    get_settings.cache_clear()

    def serve(events: list[GenerationEvent]) -> FakeEngine:
        engine = scripted_engine(events)
        service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
        return engine

    return serve


def test_chat_completion_is_built_from_engine_events(service: Service, scripted) -> None:
    engine = scripted(TWO_CHOICES)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"model": "tiny", "n": 2, "seed": 5, "stop": "\n", "messages": messages}
    response = service.client.post("/v1/chat/completions", headers=service.new_key("ada"), json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert [(c["message"]["content"], c["finish_reason"]) for c in data["choices"]] == [
        ("Hello", "length"),
        ("Bon", "stop"),
    ]
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    # OpenAI's defaults, max_tokens up to the engine's context, "developer" as the templates' "system".
    (spec, params, prompt) = engine.submitted[0]
    assert spec == ModelSpec("tiny", "tiny")
    assert params == SamplingParams(max_tokens=64, temperature=1.0, top_p=1.0, stop=["\n"], seed=5, n=2)
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_stream_sends_a_role_per_choice_then_finish_reasons_and_done(service: Service, scripted) -> None:
    engine = scripted(TWO_CHOICES)
    body = {"model": "tiny", "prompt": "Hi", "n": 2, "stream": True}
    with service.client.stream(
        "POST", "/v1/completions", headers=service.new_key("ada"), json=body
    ) as response:
        completion_chunks = sse_payloads(response)
    assert completion_chunks[-1] == "[DONE]"
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in completion_chunks[:3]] == [
        (0, "Hel"), (1, "Bon"), (0, "lo")]  # fmt: skip
    assert engine.submitted[0][1].max_tokens == 16  # OpenAI's default for completions

    body = {"model": "tiny", "messages": MESSAGES, "n": 2, "stream": True}
    with service.client.stream(
        "POST", "/v1/chat/completions", headers=service.new_key("bo"), json=body
    ) as response:
        chunks = sse_payloads(response)[:-1]
    deltas = [
        (c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks
    ]
    assert deltas == [
        (0, {"role": "assistant", "content": "Hel"}, None),
        (1, {"role": "assistant", "content": "Bon"}, None),
        (0, {"role": None, "content": "lo"}, None),
        (1, {"role": None, "content": None}, "stop"),
        (0, {"role": None, "content": None}, "length"),
    ]
    assert all("usage" not in c for c in chunks)
    assert engine.cancels == 2  # each stream released its request once it ended (a no-op when done)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [("context_length_exceeded", 400, "invalid_request_error"),
     ("model_not_found", 404, "invalid_request_error"),
     ("server_busy", 503, "server_error"), ("inference_error", 500, "server_error")],
)  # fmt: skip
def test_engine_errors_keep_their_code_in_the_openai_envelope(
    service: Service, scripted, code: str, status: int, kind: str
) -> None:
    scripted([ErrorEvent(EngineError("no room", code=code, param="model"))])
    body = {"model": "tiny", "messages": MESSAGES}
    response = service.client.post("/v1/chat/completions", headers=service.new_key("ada"), json=body)
    assert response.status_code == status
    assert response.json()["error"] == {"message": "no room", "type": kind, "param": "model", "code": code}


def test_requests_waiting_for_the_engine_hold_no_database_connection(service: Service, scripted) -> None:
    """More concurrent generations than the database pool has connections (5 + 10 overflow), streamed
    or not, all reach the engine (issue 22: the 16th of 16 concurrent streams waited for a
    connection, then failed with a 500)."""
    release = threading.Event()
    engine = held_engine(release)
    service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
    # Two users, so that neither reaches the per-user limit on requests in flight.
    users = [service.new_key("ada"), service.new_key("bob")]

    def chat(stream: bool, headers: dict[str, str]) -> int:
        body = {"model": "tiny", "messages": MESSAGES, "stream": stream, "max_tokens": 8}
        with service.client.stream("POST", "/v1/chat/completions", headers=headers, json=body) as response:
            response.read()
            return response.status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = [pool.submit(chat, i % 2 == 0, users[i // 10]) for i in range(20)]
        deadline = time.monotonic() + 20  # the pool's timeout is 30 s
        while len(engine.submitted) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        reached = len(engine.submitted)
        release.set()
        assert [status.result() for status in statuses] == [200] * 20
    assert reached == 20


@pytest.fixture
def served(
    service: Service, tiny: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Service]:
    """The service with base `tiny` listed and served by a tiny-model engine."""
    base, tokenizer, _, _ = tiny
    monkeypatch.setenv("MODULORA_BASE_MODELS", '["tiny"]')
    get_settings.cache_clear()
    config = EngineConfig(max_batch_size=4, max_seq_len=128)
    engine = InferenceEngine(config, load_base=lambda ref, device, dtype: (copy.deepcopy(base), tokenizer))
    service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
    yield service
    engine.shutdown()


def register_adapter(
    service: Service, folder: Path, user_name: str, model_id: str, base: str = "tiny"
) -> str:
    """What the worker does when a job succeeds: adapter under home/adapters, a Model row; the job id."""
    target = service.home / "adapters" / model_id
    shutil.copytree(folder, target)
    with session_scope() as session:
        user = session.query(User).filter(User.name == user_name).one()
        hyperparameters = {"lora_r": 4, "lora_alpha": 8.0, "quantization": "rtn"}  # as `random_adapter`
        job = Job(user_id=user.id, model=base, training_file="file-x", seed=0, status="succeeded",
                  hyperparameters=hyperparameters)  # fmt: skip
        session.add(job)
        session.flush()
        session.add(
            Model(
                id=model_id,
                user_id=user.id,
                job_id=job.id,
                parent=base,
                base=base,
                path=f"adapters/{model_id}",
            )
        )
        return job.id


def sse_payloads(response: Any) -> list[Any]:
    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_chat_completion_returns_openai_object_with_usage(served: Service) -> None:
    headers = served.new_key("ada")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    response = served.client.post("/v1/chat/completions", headers=headers, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5


def test_stream_chat_completion_sends_chunks_usage_and_done(
    served: Service, tiny: tuple[Any, Any, Path]
) -> None:
    headers = served.new_key("ada")
    register_adapter(served, tiny[2], "ada", "ft:tiny:ada:1")
    body = {"model": "ft:tiny:ada:1", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    whole = served.client.post("/v1/chat/completions", headers=headers, json=body).json()

    stream_body = body | {"stream": True, "stream_options": {"include_usage": True}}
    with served.client.stream("POST", "/v1/chat/completions", headers=headers, json=stream_body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)

    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completion_honours_n_stop_and_seed(served: Service) -> None:
    headers = served.new_key("ada")
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "n": 2,
        "seed": 3,
        "temperature": 1,
    }
    first = served.client.post("/v1/completions", headers=headers, json=body).json()
    again = served.client.post("/v1/completions", headers=headers, json=body).json()
    assert first["object"] == "text_completion" and len(first["choices"]) == 2
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 16

    text = first["choices"][0]["text"]
    stopped = served.client.post("/v1/completions", headers=headers,
                                 json=body | {"n": 1, "stop": [text[3:6]]}).json()  # fmt: skip
    assert stopped["choices"][0]["text"] == text[: text.find(text[3:6])]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_another_users_model_reads_as_not_found(served: Service, tiny: tuple[Any, Any, Path, Any]) -> None:
    served.new_key("ada")
    register_adapter(served, tiny[2], "ada", "ft:tiny:ada:2")
    body = {"model": "ft:tiny:ada:2", "messages": MESSAGES, "max_tokens": 2}
    response = served.client.post("/v1/chat/completions", headers=served.new_key("bob"), json=body)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert served.client.post("/v1/chat/completions", json=body).status_code == 401


def test_prompt_over_the_context_is_a_400_before_streaming(served: Service) -> None:
    body = {"model": "tiny", "prompt": "word " * 200, "max_tokens": 2}
    response = served.client.post("/v1/completions", headers=served.new_key("ada"), json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_error_after_the_stream_started_is_an_error_chunk(served: Service) -> None:
    body = {"model": "tiny", "prompt": "word " * 200, "max_tokens": 2, "stream": True}
    with served.client.stream(
        "POST", "/v1/completions", headers=served.new_key("ada"), json=body
    ) as response:
        payloads = sse_payloads(response)
    assert payloads[0]["error"]["code"] == "context_length_exceeded"
    assert payloads[-1] == "[DONE]"


def test_checkpoint_id_serves_the_checkpoint_like_the_exported_model(
    served: Service, tiny: tuple[Any, Any, Path, Any]
) -> None:
    headers = served.new_key("ada")
    job_id = register_adapter(served, tiny[2], "ada", "ft:tiny:ada:3")
    folder = served.home / "jobs" / job_id / "checkpoints" / "step-2"
    folder.mkdir(parents=True)
    # The adapter part of a training checkpoint, named as `modulora.checkpoint.save_checkpoint` names it.
    save_file({k: v.detach().contiguous() for k, v in trainable_parameters(tiny[3]).items()},
              str(folder / "adapter.safetensors"))  # fmt: skip
    with session_scope() as session:
        checkpoint = Checkpoint(job_id=job_id, step=2, path=str(folder.relative_to(served.home)))
        session.add(checkpoint)
        session.flush()
        checkpoint_id = checkpoint.id

    def answer(model: str) -> str:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
        response = served.client.post("/v1/chat/completions", headers=headers, json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert answer(checkpoint_id) == answer("ft:tiny:ada:3")
    other = served.client.post("/v1/chat/completions", headers=served.new_key("bob"),
                               json={"model": checkpoint_id, "messages": MESSAGES})  # fmt: skip
    assert other.status_code == 404

    # The public name the checkpoints list gives works wherever the id does.
    listed = served.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers).json()
    public = listed["data"][0]["fine_tuned_model_checkpoint"]
    assert public == f"ft:tiny::{job_id}:ckpt-step-2"
    assert answer(public) == answer(checkpoint_id)
    model = served.client.get(f"/v1/models/{public}", headers=headers).json()
    assert model["id"] == public and model["parent"] == f"ft:tiny::{job_id}" and model["root"] == "tiny"
    for wrong in (f"ft:other::{job_id}:ckpt-step-2", f"ft:tiny::{job_id}:ckpt-step-3"):
        response = served.client.post("/v1/chat/completions", headers=headers,
                                      json={"model": wrong, "messages": MESSAGES})  # fmt: skip
        assert response.status_code == 404, wrong
        assert served.client.get(f"/v1/models/{wrong}", headers=headers).status_code == 404


@pytest.mark.parametrize("status", ["cancelled", "failed"])
def test_a_stopped_jobs_last_checkpoint_is_served_and_downloaded(
    served: Service, tiny: tuple[Any, Any, Path, Any], status: str
) -> None:
    """A job that never exported a model: its checkpoint is served on the base the job trained on."""
    headers = served.new_key("ada")
    with session_scope() as session:
        user = session.query(User).filter(User.name == "ada").one()
        job = Job(user_id=user.id, model="tiny", training_file="file-x", seed=0, status=status,
                  hyperparameters={"lora_r": 4, "lora_alpha": 8.0, "quantization": "rtn", "bits": 4,
                                   "group_size": 128})  # fmt: skip
        session.add(job)
        session.flush()
        folder = served.home / "jobs" / job.id / "checkpoints" / "step-7"
        folder.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in trainable_parameters(tiny[3]).items()},
                  str(folder / "adapter.safetensors"))  # fmt: skip
        checkpoint = Checkpoint(job_id=job.id, step=7, path=str(folder.relative_to(served.home)))
        session.add(checkpoint)
        session.flush()
        checkpoint_id = checkpoint.id
    base_only = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    body = base_only | {"model": checkpoint_id}
    response = served.client.post("/v1/chat/completions", headers=headers, json=body)
    assert response.status_code == 200, response.text
    register_adapter(served, tiny[2], "ada", f"ft:tiny:ada:{status}")  # the same adapter, exported
    exported = served.client.post("/v1/chat/completions", headers=headers,
                                  json=base_only | {"model": f"ft:tiny:ada:{status}"})  # fmt: skip
    assert response.json()["choices"][0]["message"] == exported.json()["choices"][0]["message"]

    download = served.client.get(f"/v1/dashboard/checkpoints/{checkpoint_id}/download", headers=headers)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    assert archive.namelist() == [f"{checkpoint_id}/adapter.safetensors"]

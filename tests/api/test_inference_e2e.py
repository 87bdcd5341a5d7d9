"""End to end on CPU with the real SmolLM2: a job finishes, the `openai` SDK streams its model.

The job runs through the worker's own code (`run_job`, inline instead of through a broker); the
service runs in a real uvicorn server so the SDK streams over HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import uvicorn

from api.inference.service import get_inference_engine
from modulora.serve.engine import InferenceEngine
from modulora.serve.types import EngineConfig
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.conftest import REPO
from worker.tasks.train import run_job

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def server(service: Service) -> Iterator[str]:
    """The service's app on a free localhost port, with a CPU engine; yields the base URL."""
    # The SmolLM2 conversion the other tests share, instead of converting the GGUF again (~35 s).
    shared_models = REPO / ".cache" / "test-home" / "models"
    if shared_models.is_dir():
        service.home.mkdir(parents=True, exist_ok=True)
        (service.home / "models").symlink_to(shared_models, target_is_directory=True)
    engine = InferenceEngine(EngineConfig(device="cpu", max_batch_size=2, max_seq_len=256))
    app = service.client.app
    app.dependency_overrides[get_inference_engine] = lambda: engine
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    uv.should_exit = True
    thread.join()
    engine.shutdown()


def test_openai_sdk_streams_a_chat_completion_from_a_fresh_job(service: Service, server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key=service.new_key("ada")["Authorization"][7:])
    upload = client.files.create(file=("train.jsonl", jsonl([CHAT_ROW], copies=10)), purpose="fine-tune")
    # One optimizer step on the GGUF's own 4-bit weights: the job is the set-up, not the subject.
    hyperparameters = {"n_epochs": 1, "batch_size": 2, "quantization": "gguf", "lora_r": 4,
                       "lora_targets": ["q_proj", "v_proj"], "max_steps": 1, "max_seq_len": 32}  # fmt: skip
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct",
        training_file=upload.id,
        extra_body={"hyperparameters": hyperparameters},
    )
    run_job(job.id, worker="test-worker")  # what the Celery worker does with the enqueued id
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error

    stream = client.chat.completions.create(
        model=job.fine_tuned_model, messages=MESSAGES, max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4

    assert text and chunks[-2].choices[0].finish_reason in ("stop", "length")
    adapter = next(m for m in client.models.list() if m.id == job.fine_tuned_model)
    assert adapter.parent == "smollm2-135m-instruct"

"""End to end on CPU with the real SmolLM2 and the service's own engine (no override).

A job finishes and the `openai` SDK streams its model; `modulora generate` and the chat endpoint
give the same answer for the same adapter; 16 concurrent first requests share one engine. The
service runs in a real uvicorn server, so requests arrive concurrently over HTTP.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from api.inference import service as inference_service
from modulora import cli
from modulora.export import load_adapter
from modulora.generate import generate
from modulora.models import load_model
from modulora.serve.engine import InferenceEngine
from modulora.serve.types import SamplingParams
from tests.api.conftest import Service, jsonl
from tests.api.test_inference import register_adapter
from tests.conftest import REPO
from worker.tasks.train import run_job

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def server(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The service's app on a free localhost port with its own CPU engine; yields the base URL."""
    # The SmolLM2 conversion the other tests share, instead of converting the GGUF again (~35 s).
    shared_models = REPO / ".cache" / "test-home" / "models"
    if shared_models.is_dir():
        service.home.mkdir(parents=True, exist_ok=True)
        (service.home / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("MODULORA_INFERENCE_DEVICE", "cpu")
    monkeypatch.setenv("MODULORA_INFERENCE_MAX_SEQ_LEN", "256")
    inference_service._create_engine.cache_clear()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(service.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    uv.should_exit = True
    thread.join()
    if inference_service._create_engine.cache_info().currsize:
        inference_service._create_engine().shutdown()
    inference_service._create_engine.cache_clear()


def sdk(service: Service, server: str, user: str = "ada") -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=service.new_key(user)["Authorization"][7:])


# The first assistant turn is context only (weight 0): its tokens must carry no loss.
WEIGHTED_ROW = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Rambling context that must not be learned from, at all.", "weight": 0},
    {"role": "user", "content": [{"type": "text", "text": "Again?"}]},
    {"role": "assistant", "content": "Hello!"},
]}  # fmt: skip


def label_tokens_per_row(row: dict, max_seq_len: int) -> int:
    """Loss tokens of one row as training counts them (labels after the first position)."""
    from modulora.data import IGNORE_INDEX, build_examples
    from modulora.models import load_tokenizer

    (example,) = build_examples([row], "auto", load_tokenizer(BASE), max_seq_len)
    assert len(example["input_ids"]) < max_seq_len, "the row must not be truncated for this count"
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def test_openai_sdk_streams_a_chat_completion_from_a_fresh_job(service: Service, server: str) -> None:
    """A fresh job through the SDK, and what OpenAI's contract promises about it: integrations
    echoed and logged (TensorBoard always), the step-metrics result file, checkpoint names that
    serve chat, and weight-0 turns that carry no loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = sdk(service, server)
    upload = client.files.create(file=("train.jsonl", jsonl([WEIGHTED_ROW], copies=10)), purpose="fine-tune")
    # One optimizer step on the GGUF's own 4-bit weights: the job is the set-up, not the subject.
    hyperparameters = {"n_epochs": 1, "batch_size": 2, "quantization": "gguf", "lora_r": 4,
                       "lora_targets": ["q_proj", "v_proj"], "max_steps": 1, "max_seq_len": 96}  # fmt: skip
    integrations = [{"type": "wandb", "wandb": {"project": "modulora-tests", "tags": ["e2e"]}}]
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=upload.id,
        integrations=integrations,  # type: ignore[arg-type]
        extra_body={"hyperparameters": hyperparameters},
    )
    assert job.integrations is not None and job.integrations[0].wandb.project == "modulora-tests"
    run_job(job.id, worker="test-worker")  # what the Celery worker does with the enqueued id
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error

    # Weight 0: the step's loss tokens are the weight-1 turns' only (two rows in the step).
    (step,) = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    expected = 2 * label_tokens_per_row(WEIGHTED_ROW, 96)
    unweighted = {
        "messages": [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED_ROW["messages"]]
    }
    assert expected < 2 * label_tokens_per_row(unweighted, 96)  # the count tells the two apart
    assert step["label_tokens"] == expected

    # result_files: OpenAI's step-metrics CSV, downloadable through the files API.
    (result_id,) = job.result_files
    assert client.files.retrieve(result_id).purpose == "fine-tune-results"
    table = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert list(table[0])[:5] == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    assert [int(r["step"]) for r in table] == [1]
    assert float(table[0]["train_loss"]) == pytest.approx(step["train_loss"])

    # integrations: TensorBoard event files always; W&B logs offline when installed, else says so.
    events = EventAccumulator(str(service.home / "jobs" / job.id / "tensorboard"))
    events.Reload()
    (scalar,) = events.Scalars("train_loss")
    assert (scalar.step, scalar.value) == (1, pytest.approx(step["train_loss"]))
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    wandb_installed = importlib.util.find_spec("wandb") is not None
    assert any(("Weights & Biases" in m) and (("skipped" in m) != wandb_installed) for m in messages)

    # A checkpoint's public name serves chat like the fine-tuned model.
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id)
    by_name = client.chat.completions.create(
        model=checkpoint.fine_tuned_model_checkpoint, messages=MESSAGES, max_tokens=4, temperature=0
    )
    final = client.chat.completions.create(
        model=job.fine_tuned_model, messages=MESSAGES, max_tokens=4, temperature=0
    )
    assert by_name.choices[0].message.content == final.choices[0].message.content

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
    assert adapter.parent == BASE


def test_cli_generate_and_the_chat_endpoint_give_the_same_greedy_answer(
    service: Service, server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real adapter: a few LoRA steps on SmolLM2 with the library's own command, then exported.
    answer = {"role": "assistant", "content": "Ahoy, sailor! The sea is calm today."}
    rows = [{"messages": [{"role": "user", "content": "Hi"}, answer]}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 8))
    run = tmp_path / "run"
    finetune = ["finetune", "--model", BASE, "--data", data, "--max-steps", 2, "--micro-batch-size", 2,
                "--learning-rate", "1e-2", "--lora-r", 8, "--target-modules", "q_proj", "v_proj",
                "--max-seq-len", 48, "--out", run, "--device", "cpu"]  # fmt: skip
    assert cli.main([str(arg) for arg in finetune]) == 0
    capsys.readouterr()

    max_tokens = 12
    generate_command = ["generate", "--model", BASE, "--adapter", str(run), "--chat", "--prompt", "Hi",
                        "--max-new-tokens", str(max_tokens), "--device", "cpu"]  # fmt: skip
    assert cli.main(generate_command) == 0
    from_cli = capsys.readouterr().out.removesuffix("\n")

    client = sdk(service, server)
    register_adapter(service, run / "adapter", "ada", "ft:smollm2:ada:1", base=BASE)

    def chat(model: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0
        )

    from_api = chat("ft:smollm2:ada:1")
    assert from_api.choices[0].message.content == from_cli
    assert from_cli != chat(BASE).choices[0].message.content, "the adapter should change the answer"

    # The in-memory helper eval uses, on the model with the adapter's LoRA modules attached: the
    # same token ids (as many as the API counted) and the same text.
    model, tokenizer = load_model(BASE)
    load_adapter(model, run / "adapter")
    (in_memory,) = generate(
        model, tokenizer, [MESSAGES], SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    assert len(in_memory.token_ids) == from_api.usage.completion_tokens
    assert in_memory.text == from_cli


def test_concurrent_first_requests_share_one_engine(
    service: Service, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issues 22/23: concurrent first requests each built an engine, their loads raced, and every
    chat failed afterwards with "Cannot copy out of meta tensor"."""
    built = []
    init = InferenceEngine.__init__

    def counted_init(engine: InferenceEngine, *args: object, **kwargs: object) -> None:
        built.append(engine)
        time.sleep(0.2)  # the window in which a concurrent first call would build a second engine
        init(engine, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "__init__", counted_init)
    headers = service.new_key("ada")
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 3, "temperature": 0}

    def chat(_: int) -> httpx.Response:
        return httpx.post(f"{server}/chat/completions", json=body, headers=headers, timeout=600)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(chat, range(16)))
    assert [r.status_code for r in responses] == [200] * 16, [
        r.text for r in responses if r.status_code != 200
    ]
    assert all(r.json()["choices"][0]["message"]["content"] for r in responses)
    assert len(built) == 1
    again = chat(16)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] > 0

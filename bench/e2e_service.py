"""The service end to end, as a user drives it: `modulora serve --with-worker` with embedded defaults
(SQLite database and broker) in a fresh MODULORA_HOME, and the stock `openai` SDK for everything.

Model A, SmolLM2-135M-Instruct: one fine-tuning job per base (native GGUF, OPTQ 4-bit, OPTQ 3-bit,
QuIP# 2-bit) on TREC question classification (6 classes; chat rows written here from the raw
dataset). After every job has run, each fine-tuned model gets a freshly started service (a cold
engine) and answers 16 concurrent streamed first requests, then the held-out questions over
/v1/chat/completions (greedy, label string match). The same settings then run through the library
(`modulora finetune` + `modulora eval --task exact-match`, on the base the job built): the two
accuracies must agree within one point.

Model B, a synthetic LLaMA-shaped checkpoint (random bf16 weights, sharded safetensors, SmolLM2's
tokenizer; `bench/synthetic_checkpoint.py`) registered through MODULORA_BASE_MODELS: a job with
default hyperparameters (OPTQ 4-bit) under a memory budget for the whole GPU, split between the
worker (MODULORA_GPU_MEMORY_BUDGET_BYTES) and the engine (MODULORA_INFERENCE_MEMORY_BUDGET_BYTES);
when the service refuses the defaults' memory estimate, the job takes the micro-batch or length its
error names. Then 16 concurrent streamed chats with the result on a cold engine.

Measured per phase: quantize time (from the job's events, seen live), training step time and
tokens/s (the job's metrics events), peak GPU memory of the worker's and the API's process trees
(nvidia-smi sampled in a thread), peak host RSS of each tree (psutil), time to first token and
decode tokens/s over HTTP (streamed). Prints a table and the checks; saves JSON; exits 1 when a check
fails.

    python -m bench.e2e_service --models smollm2 --bases gguf optq-4 --out e2e_a1.json
    python -m bench.e2e_service --models synthetic --shapes 7b --out e2e_7b.json
    python -m bench.e2e_service --tiny          # the same flow on CPU in a few minutes

On a machine without ../shared, pass `--data-dir` holding trec/train.jsonl and trec/test.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from openai import BadRequestError, OpenAI, OpenAIError

from bench._common import environment, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
SMOLLM2 = "smollm2-135m-instruct"
GIB = 2**30
TERMINAL = ("succeeded", "failed", "cancelled")

# TREC coarse classes by label index (../shared/datasets/trec/SOURCE.md); the model answers the word.
TREC_LABELS = ["description", "entity", "abbreviation", "human", "location", "number"]
TREC_PROMPT = (
    "Classify the question by the kind of answer it asks for: description, entity, abbreviation, "
    "human, location or number. Reply with the category only.\n\nQuestion: {question}"
)
BURST_PROMPT = "Tell me about the history of the {topic} in a few paragraphs."
BURST_TOPICS = [
    "bicycle",
    "telescope",
    "printing press",
    "compass",
    "clock",
    "steam engine",
    "radio",
    "camera",
]

# This bench is one user with 16 requests in flight at once; the service's per-user limit (8 by
# default, where it has one) would answer half of them with 429.
ONE_USER = {"MODULORA_USER_MAX_CONCURRENT_REQUESTS": "16"}

# Each SmolLM2 job's base, as the job's hyperparameters name it (group size: the service's default).
BASES = {
    "gguf": {"quantization": "gguf", "bits": 4},
    "optq-4": {"quantization": "optq", "bits": 4},
    "optq-3": {"quantization": "optq", "bits": 3},
    "quip#-2": {"quantization": "quip#", "bits": 2},
    "rtn-4": {"quantization": "rtn", "bits": 4},  # no calibration: the quick quantized base for --tiny
}
# The inference engine's share of the synthetic model's GPU budget: 4-bit weights, bf16 embeddings
# and LM head, and a KV cache of a few 2,048-token rows; the worker gets the rest.
INFERENCE_GIB = {"tiny": 1.0, "7b": 8.0, "13b": 11.0}
BASE_LEARNING_RATE = 2e-4
"""The service's learning rate at multiplier 1 (core.config.BASE_LEARNING_RATE; bench/ may not
import core). The library run passes it explicitly."""


# ------------------------------------------------------------------------------------------ data


def write_trec_chat(data_dir: Path, out: Path, train_rows: int, val_rows: int, test_rows: int) -> dict:
    """Chat rows (user question, assistant label word) for train/validation from TREC's train split
    (shuffled with seed 0) and for test from its test split; returns the file paths."""

    def read(name: str) -> list[tuple[str, int]]:
        lines = (data_dir / "trec" / name).read_text().splitlines()
        return [(row["sentence"], int(row["label"])) for row in map(json.loads, filter(str.strip, lines))]

    train = read("train.jsonl")
    random.Random(0).shuffle(train)
    splits = {
        "train": train[:train_rows],
        "validation": train[train_rows : train_rows + val_rows],
        "test": read("test.jsonl")[:test_rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = out / f"trec_{split}.jsonl"
        with open(paths[split], "w") as f:
            for question, label in rows:
                messages = [
                    {"role": "user", "content": TREC_PROMPT.format(question=question)},
                    {"role": "assistant", "content": TREC_LABELS[label]},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return paths


def read_chat_rows(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) per row of a chat file written above."""
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    return [(messages[:-1], messages[-1]["content"]) for messages in rows]


# ------------------------------------------------------------------------------ process sampling


class TreeSampler(threading.Thread):
    """Samples the service's two process trees: the worker (`... worker`, its Celery pool children
    included) and the API (everything else under the serve process). Per tree: summed host RSS and
    GPU memory (nvidia-smi's per-process `used_memory`); the peaks since the last `take()`."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.root: psutil.Process | None = None
        self._lock = threading.Lock()
        self._peaks: dict[str, float] = {}
        self._stop_event = threading.Event()
        self.has_gpu = _has_nvidia_smi()

    def attach(self, pid: int) -> None:
        with self._lock:
            self.root = psutil.Process(pid)

    def take(self) -> dict[str, float]:
        """Peaks (GiB) since the previous call, and start again."""
        with self._lock:
            peaks, self._peaks = self._peaks, {}
        return {key: round(value / GIB, 3) for key, value in peaks.items()}

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            with self._lock:
                root = self.root
            if root is None:
                continue
            try:
                sample = self._sample(root)
            except psutil.Error:  # a process ended between listing and reading it
                continue
            with self._lock:
                for key, value in sample.items():
                    self._peaks[key] = max(self._peaks.get(key, 0.0), value)

    def _sample(self, root: psutil.Process) -> dict[str, float]:
        children = root.children(recursive=True)
        worker_roots = [p for p in children if "worker" in _cmdline(p)]
        worker = {p.pid for w in worker_roots for p in (w, *w.children(recursive=True))}
        api = {root.pid, *(p.pid for p in children)} - worker
        sample = {"worker_rss": 0.0, "api_rss": 0.0}
        for process in (root, *children):
            with contextlib.suppress(psutil.Error):
                sample["worker_rss" if process.pid in worker else "api_rss"] += process.memory_info().rss
        if self.has_gpu:
            used, sample["gpu_device_used"] = _gpu_memory()
            sample["worker_gpu"] = sum(b for pid, b in used.items() if pid in worker)
            sample["api_gpu"] = sum(b for pid, b in used.items() if pid in api)
            sample["gpu_both"] = sample["worker_gpu"] + sample["api_gpu"]
            # Processes nvidia-smi lists outside both trees (another PID namespace, other users).
            sample["gpu_unattributed"] = sum(b for pid, b in used.items() if pid not in worker | api)
        return sample


def _cmdline(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []


def _has_nvidia_smi() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _gpu_memory() -> tuple[dict[int, float], float]:
    """(bytes of GPU memory per process id, bytes used on all GPUs), from nvidia-smi."""

    def query(*args: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
        ).stdout
        return [[field.strip() for field in line.split(",")] for line in out.splitlines() if line.strip()]

    used: dict[int, float] = {}
    for pid, mib in query("--query-compute-apps=pid,used_memory"):
        if pid.isdigit() and mib.isdigit():
            used[int(pid)] = used.get(int(pid), 0.0) + int(mib) * 2**20
    device = sum(int(mib) * 2**20 for (mib,) in query("--query-gpu=memory.used") if mib.isdigit())
    return used, float(device)


# ------------------------------------------------------------------------------------- service


class Service:
    """`serve_cmd` (by default `python -m api.cli serve --with-worker`) on a free port over `home`,
    with only the environment given here among the service's settings; `restart()` gives a cold engine."""

    def __init__(
        self, home: Path, serve_cmd: list[str], keys_cmd: list[str], sampler: TreeSampler, env: dict[str, str]
    ) -> None:
        self.home, self.serve_cmd, self.keys_cmd, self.sampler = home, serve_cmd, keys_cmd, sampler
        self.port = _free_port()
        # Embedded defaults: no service URL or other MODULORA_ setting leaks in from the caller.
        service_urls = ("DATABASE_URL", "REDIS_URL", "BROKER_URL")
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith("MODULORA_") and k not in service_urls
        }
        self.env = inherited | {"MODULORA_HOME": str(home), "MODULORA_PORT": str(self.port)} | ONE_USER | env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.client: OpenAI | None = None

    @property
    def log(self) -> Path:
        return self.home / f"serve-{self.starts}.log"

    def start(self) -> float:
        """Start the service and wait for /health; seconds until healthy."""
        self.starts += 1
        started = time.perf_counter()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*self.serve_cmd, "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches the worker too
            )
        self.sampler.attach(self.process.pid)
        url = f"http://127.0.0.1:{self.port}"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"no /health after 300 s:\n{self.log_tail()}")
            time.sleep(0.5)
        if self.client is None:
            self.client = OpenAI(base_url=f"{url}/v1", api_key=self._create_key(), max_retries=0, timeout=600)
        return time.perf_counter() - started

    def _create_key(self) -> str:
        """A key from the service's own `keys create` command (prints the key on its last line)."""
        result = subprocess.run(
            self.keys_cmd, cwd=REPO, env=self.env, capture_output=True, text=True, check=True
        )
        return result.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        """SIGTERM (serve stops its worker), SIGKILL to the process group after 90 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # a pool child that outlived its parent
            os.killpg(self.process.pid, signal.SIGKILL)

    def restart(self) -> float:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The log's last lines, without uvicorn's access lines (this bench polls twice a second)."""
        if not self.log.exists():
            return ""
        logged = self.log.read_text(errors="replace").splitlines()
        return "\n".join([line for line in logged if not line.startswith("INFO:     127.0.0.1:")][-lines:])

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------- jobs


def upload(client: OpenAI, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def run_job(
    service: Service, model: str, files: dict[str, str], hyperparameters: dict, seed: int, timeout_s: float
) -> dict:
    """Create a job, follow its events until it ends, and summarize its phases."""
    client = service.client
    assert client is not None
    service.sampler.take()
    started = time.perf_counter()
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=files["train"],
        validation_file=files.get("validation"),
        seed=seed,
        hyperparameters=hyperparameters,  # our keys ride along: the SDK sends the dict as it is
    )
    seen: dict[str, float] = {}  # event id -> seconds after creation when first listed
    while True:
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
            seen.setdefault(event.id, time.perf_counter() - started)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in TERMINAL:
            break
        if time.perf_counter() - started > timeout_s:  # the job counts as failed; the bench goes on
            job = client.fine_tuning.jobs.cancel(job.id)
            break
        time.sleep(0.5)
    wall_s = time.perf_counter() - started
    peaks = service.sampler.take()
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
    result = {
        "job": job.id,
        "status": job.status,
        "fine_tuned_model": job.fine_tuned_model,
        "hyperparameters": job.hyperparameters.model_dump(),
        "job_s": round(wall_s, 1),
        "quantize_s": _quantize_seconds(events, seen),
        **_training_summary(events),
        "trained_tokens": job.trained_tokens,
        **{f"job_{key}_gib": value for key, value in peaks.items()},
    }
    if job.status != "succeeded":
        result["error"] = job.error.model_dump() if job.error else None
        result["log_tail"] = service.log_tail()
    return result


def _quantize_seconds(events: list[Any], seen: dict[str, float]) -> float | None:
    """From the worker's first "Quantizing ..." event to the first event after it that is not one
    (its per-layer progress events also start so), as this poll saw them (±0.5 s); None when the
    base needed no quantizing."""
    started = next((e for e in events if e.message.startswith("Quantizing")), None)
    if started is None or started.id not in seen:
        return None
    after = events[events.index(started) + 1 :]
    ended = next((e for e in after if not e.message.startswith("Quantizing") and e.id in seen), None)
    return round(seen[ended.id] - seen[started.id], 1) if ended else None


def _training_summary(events: list[Any]) -> dict:
    steps = [e.data for e in events if e.type == "metrics" and e.data and "step_time_s" in e.data]
    if not steps:
        return {"steps": 0}
    steady = steps[3:] or steps  # the first steps capture CUDA graphs
    return {
        "steps": len(steps),
        "step_s": round(statistics.median(s["step_time_s"] for s in steady), 4),
        "train_tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in steady), 1),
        "train_peak_gib": round(max(s.get("memory_peak_bytes") or 0 for s in steps) / GIB, 3),
        "final_loss": round(steps[-1]["train_loss"], 4),
    }


# ----------------------------------------------------------------------------------------- chat


def chat_burst(client: OpenAI, model: str, prompts: list[list[dict]], max_tokens: int) -> dict:
    """All prompts at once as streamed chats: how many were answered, time to first token, decode
    tokens/s per request and over the burst."""
    barrier = threading.Barrier(len(prompts))

    def one(messages: list[dict]) -> dict:
        barrier.wait()
        sent = time.perf_counter()
        first = None
        tokens = 0
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens,
                temperature=0,
            )
            for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
        except OpenAIError as error:
            return {"error": f"{type(error).__name__}: {error}"}
        end = time.perf_counter()
        first = first or end
        decode = (tokens - 1) / (end - first) if tokens > 1 and end > first else None
        return {"ttft_s": first - sent, "tokens": tokens, "decode_tok_s": decode, "sent": sent, "end": end}

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    answered = [r for r in results if "error" not in r]
    summary: dict[str, Any] = {"requests": len(prompts), "answered": len(answered)}
    if answered:
        decode = [r["decode_tok_s"] for r in answered if r["decode_tok_s"] is not None]
        span = max(r["end"] for r in answered) - min(r["sent"] for r in answered)
        summary |= {
            "ttft_median_s": round(statistics.median(r["ttft_s"] for r in answered), 3),
            "ttft_max_s": round(max(r["ttft_s"] for r in answered), 3),
            "completion_tokens": sum(r["tokens"] for r in answered),
            "decode_tok_s_per_request": round(statistics.median(decode), 1) if decode else None,
            "burst_tok_s": round(sum(r["tokens"] for r in answered) / span, 1),
        }
    errors = sorted({r["error"] for r in results if "error" in r})
    if errors:
        summary["errors"] = errors
    return summary


def chat_accuracy(client: OpenAI, model: str, rows: list[tuple[list[dict], str]], max_tokens: int) -> dict:
    """Greedy chat answers to the test rows (16 in flight), scored as `modulora eval --task
    exact-match` scores them (normalized string equality with the label)."""
    from modulora.eval.tasks import exact_match

    def answer(messages: list[dict]) -> str:
        completion = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return completion.choices[0].message.content or ""

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        predictions = list(pool.map(answer, [messages for messages, _ in rows]))
    return {
        "api_accuracy": round(exact_match(predictions, [label for _, label in rows]), 4),
        "api_eval_s": round(time.perf_counter() - started, 1),
    }


# -------------------------------------------------------------------------------- library run


def _schedule_options(hp: dict) -> list[str]:
    """`modulora finetune` options for the job's schedule. A service whose jobs do not name them
    trains with TrainConfig's own defaults (linear, no warmup), which these then spell out."""
    options = ["--schedule", hp.get("schedule", "linear"), "--warmup-ratio", str(hp.get("warmup_ratio", 0.0))]
    if "weight_decay" in hp:
        options += ["--weight-decay", str(hp["weight_decay"])]
    if hp.get("packing"):
        options.append("--packing")
    if hp.get("eval_every"):
        options += ["--eval-every", str(hp["eval_every"])]
    return options


def library_accuracy(
    home: Path, job: dict, paths: dict[str, Path], out: Path, device: str, max_tokens: int
) -> dict:
    """The job's settings through the library's commands, on the base the job trained on (its
    adapter's manifest names it): `modulora finetune` then `modulora eval --task exact-match`."""
    manifest = json.loads((home / "adapters" / job["job"] / "manifest.json").read_text())
    base = manifest["base_model"]
    base = str(home / base) if (home / base).exists() else base  # recorded relative to the home
    hp = job["hyperparameters"]
    targets = hp["lora_targets"] if isinstance(hp["lora_targets"], list) else [hp["lora_targets"]]
    finetune = [
        sys.executable, "-m", "modulora.cli", "finetune", "--model", base, "--device", device,
        "--data", str(paths["train"]), "--validation", str(paths["validation"]),
        "--lora-r", str(hp["lora_r"]), "--lora-alpha", str(hp["lora_alpha"]),
        "--lora-dropout", str(hp["lora_dropout"]), "--target-modules", *targets,
        "--epochs", str(hp["n_epochs"]), *(["--max-steps", str(hp["max_steps"])] if hp["max_steps"] else []),
        "--learning-rate", str(BASE_LEARNING_RATE * hp["learning_rate_multiplier"]),
        "--micro-batch-size", str(hp["micro_batch_size"]),
        "--gradient-accumulation", str(hp["batch_size"] // hp["micro_batch_size"]),
        "--max-seq-len", str(hp["max_seq_len"]), *_schedule_options(hp),
        "--dtype", "bf16" if device == "cuda" else "fp32", "--seed", str(job["seed"]), "--out", str(out),
        *(["--gradient-checkpointing"] if hp["gradient_checkpointing"] else []),
    ]  # fmt: skip
    evaluate = [
        sys.executable, "-m", "modulora.cli", "eval", "--model", base, "--adapter", str(out),
        "--device", device, "--task", "exact-match", "--data", str(paths["test"]),
        "--max-new-tokens", str(max_tokens), "--batch-size", "16",
    ]  # fmt: skip
    env = os.environ | {"MODULORA_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run(finetune, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    trained = time.perf_counter()
    printed = subprocess.run(evaluate, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    accuracy = float(printed.rsplit("exact_match:", 1)[1].split()[0])
    return {
        "library_accuracy": round(accuracy, 4),
        "library_finetune_s": round(trained - started, 1),
        "library_eval_s": round(time.perf_counter() - trained, 1),
    }


# ---------------------------------------------------------------------------------------- flows


def run_smollm2(
    args: argparse.Namespace, work: Path, sampler: TreeSampler, report: list[dict], save: Callable[[], Any]
) -> None:
    """Model A: one job per base, then per model a cold-engine burst and the held-out accuracy over
    the API; then the library's run of each job's settings. Rows go into `report`, saved as they grow."""
    paths = write_trec_chat(args.data_dir, work / "data", args.train_rows, args.val_rows, args.test_rows)
    test_rows = read_chat_rows(paths["test"])
    # Half held-out questions (a label word each), half open questions (long answers, for decode speed).
    burst_prompts = [messages for messages, _ in test_rows[:8]]
    burst_prompts += [[{"role": "user", "content": BURST_PROMPT.format(topic=t)}] for t in BURST_TOPICS]
    hyperparameters = {
        "n_epochs": 1,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "learning_rate_multiplier": args.lr_multiplier,
        "max_seq_len": 128,
        **({"max_steps": args.max_steps} if args.max_steps else {}),
    }
    home = work / "home-smollm2"
    home.mkdir(parents=True)
    rows: list[dict] = []
    with Service(home, args.serve_cmd, args.keys_cmd, sampler, env={}) as service:
        client = service.client
        assert client is not None
        files = {split: upload(client, paths[split]) for split in ("train", "validation")}
        for base in args.bases:
            print(f"smollm2 / {base}: job", flush=True)
            row = {"model": SMOLLM2, "base": base, "seed": args.seed}
            row |= run_job(
                service, SMOLLM2, files, hyperparameters | BASES[base], args.seed, args.job_timeout_s
            )
            print(f"  {row['status']} in {row['job_s']} s", flush=True)
            rows.append(row)
            report.append(row)
            save()
        for row in rows:
            if row["status"] != "succeeded":
                continue
            print(f"smollm2 / {row['base']}: cold engine, 16 first requests, accuracy", flush=True)
            row["restart_s"] = round(service.restart(), 1)
            sampler.take()
            burst = chat_burst(client, row["fine_tuned_model"], burst_prompts, args.burst_tokens)
            row |= {f"cold_{key}": value for key, value in burst.items()}
            row |= chat_accuracy(client, row["fine_tuned_model"], test_rows, args.answer_tokens)
            row |= {f"serve_{key}_gib": value for key, value in sampler.take().items()}
            if row["cold_answered"] < row["cold_requests"]:
                row["log_tail"] = service.log_tail()
            save()
    for row in rows:
        if row["status"] == "succeeded" and not args.skip_library:
            print(f"smollm2 / {row['base']}: the library's run", flush=True)
            library = work / f"library-{row['base']}"
            try:
                row |= library_accuracy(home, row, paths, library, args.device, args.answer_tokens)
            except subprocess.CalledProcessError as error:  # its output went to this bench's stderr
                row["library_error"] = str(error)
                continue
            row["accuracy_gap_points"] = round(100 * abs(row["api_accuracy"] - row["library_accuracy"]), 2)
            save()


def run_synthetic(
    args: argparse.Namespace,
    work: Path,
    sampler: TreeSampler,
    shape: str,
    report: list[dict],
    save: Callable[[], Any],
) -> None:
    """Model B: a synthetic LLaMA checkpoint, a default job under the budget, 16 streamed chats."""
    home = work / f"home-{shape}"
    home.mkdir(parents=True)
    folder = work / f"llama-{shape}"
    started = time.perf_counter()
    # Its own process over the service's home, where SmolLM2 (the tokenizer's source) is converted.
    write = [sys.executable, "-m", "bench.synthetic_checkpoint", "--shape", shape, "--out", str(folder)]
    subprocess.run(write, cwd=REPO, env=os.environ | {"MODULORA_HOME": str(home)}, check=True)
    row: dict[str, Any] = {"model": f"synthetic-{shape}", "base": "optq-4 (default)", "seed": args.seed}
    row["write_checkpoint_s"] = round(time.perf_counter() - started, 1)
    report.append(row)
    paths = write_trec_chat(args.data_dir, work / f"data-{shape}", args.synthetic_rows, 0, 16)
    budget = int(args.budget_gib * GIB)
    inference = int((args.inference_gib or INFERENCE_GIB[shape]) * GIB)
    env = {
        "MODULORA_BASE_MODELS": json.dumps([str(folder)]),
        "MODULORA_GPU_MEMORY_BUDGET_BYTES": str(budget - inference),
        "MODULORA_INFERENCE_MEMORY_BUDGET_BYTES": str(inference),
    }
    with Service(home, args.serve_cmd, args.keys_cmd, sampler, env=env) as service:
        client = service.client
        assert client is not None
        # The id the service gives the folder: the path itself, or (with named base models) its name.
        model = next(m.id for m in client.models.list() if m.id in (str(folder), folder.name))
        files = {"train": upload(client, paths["train"])}
        print(f"synthetic {shape}: job", flush=True)
        hyperparameters = {"max_steps": args.max_steps} if args.max_steps else {}
        try:
            row |= run_job(service, model, files, hyperparameters, args.seed, args.job_timeout_s)
        except BadRequestError as refusal:
            if refusal.code != "insufficient_memory":
                raise
            # The defaults' estimate exceeds the worker's share: take the setting the refusal names.
            row["default_refused"] = refusal.message
            hyperparameters |= {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", refusal.message)}
            row |= run_job(service, model, files, hyperparameters, args.seed, args.job_timeout_s)
        print(f"  {row['status']} in {row['job_s']} s", flush=True)
        save()
        if row["status"] == "succeeded":
            print(f"synthetic {shape}: cold engine, 16 streamed chats", flush=True)
            row["restart_s"] = round(service.restart(), 1)
            prompts = [[{"role": "user", "content": BURST_PROMPT.format(topic=t)}] for t in BURST_TOPICS * 2]
            burst = chat_burst(client, row["fine_tuned_model"], prompts, args.burst_tokens)
            row |= {f"cold_{key}": value for key, value in burst.items()}
            row |= {f"serve_{key}_gib": value for key, value in sampler.take().items()}
            if row["cold_answered"] < row["cold_requests"]:
                row["log_tail"] = service.log_tail()
    if sampler.has_gpu:
        row["budget_gib"] = args.budget_gib
        both = max(row.get("job_gpu_both_gib", 0.0), row.get("serve_gpu_both_gib", 0.0))
        # nvidia-smi lists no processes of ours from inside some containers: then the device's use counts.
        both = both or max(row.get("job_gpu_device_used_gib", 0.0), row.get("serve_gpu_device_used_gib", 0.0))
        row["within_budget"] = both <= args.budget_gib
    save()


def checks(rows: list[dict], compare_library: bool) -> list[tuple[str, bool]]:
    """What the run must show, per row: the job succeeded, every cold request was answered, the
    API's and the library's accuracy agree within one point, the synthetic job stayed in budget."""
    found = []
    for r in rows:
        name = f"{r['model']} {r['base']}"
        found.append((f"{name}: job succeeded", r["status"] == "succeeded"))
        if r["status"] != "succeeded":
            continue
        found.append(
            (f"{name}: 16 cold first requests answered", r.get("cold_answered") == r.get("cold_requests"))
        )
        if r["model"] == SMOLLM2 and compare_library:
            found.append(
                (
                    f"{name}: API accuracy within 1 point of the library's",
                    r.get("accuracy_gap_points", 100) <= 1.0,
                )
            )
        if r.get("within_budget") is not None:
            found.append((f"{name}: GPU memory within {r['budget_gib']} GiB", r["within_budget"]))
    return found


COLUMNS = [
    "model", "base", "status", "quantize_s", "step_s", "train_tokens_per_s", "job_worker_gpu_gib",
    "job_worker_rss_gib", "serve_api_gpu_gib", "serve_api_rss_gib", "cold_answered", "cold_ttft_median_s",
    "cold_decode_tok_s_per_request", "cold_burst_tok_s", "api_accuracy", "library_accuracy",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["smollm2", "synthetic"], choices=["smollm2", "synthetic"]
    )
    parser.add_argument("--bases", nargs="+", choices=list(BASES), help="SmolLM2 job bases")
    parser.add_argument("--shapes", nargs="+", help="synthetic checkpoint shapes (7b, 13b; tiny for --tiny)")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke: few rows and steps, the gguf base, tiny shape"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DATASETS, help="holds trec/train.jsonl, trec/test.jsonl"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="homes, data, checkpoints (default: a temporary folder)"
    )
    parser.add_argument(
        "--serve-cmd", type=shlex.split, default=[sys.executable, "-m", "api.cli", "serve", "--with-worker"],
        help="how to start the service (`--port N` is appended)",
    )  # fmt: skip
    parser.add_argument(
        "--keys-cmd", type=shlex.split,
        default=[sys.executable, "-m", "api.cli", "keys", "create", "--user", "bench"],
        help="prints a new API key on its last line",
    )  # fmt: skip
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--val-rows", type=int, default=200)
    parser.add_argument("--test-rows", type=int, default=500, help="TREC's test split has 500")
    parser.add_argument("--synthetic-rows", type=int, default=80, help="training rows of the synthetic job")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr-multiplier", type=float, default=2.0, help="x 2e-4")
    parser.add_argument(
        "--max-steps", type=int, default=0, help="0: one epoch (SmolLM2), defaults (synthetic)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--burst-tokens", type=int, default=128, help="max_tokens of each cold request")
    parser.add_argument("--answer-tokens", type=int, default=8, help="max_tokens of each scored answer")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="synthetic: the whole GPU's budget")
    parser.add_argument(
        "--inference-gib", type=float, help=f"synthetic: the engine's share of it (default: {INFERENCE_GIB})"
    )
    parser.add_argument("--job-timeout-s", type=float, default=1800)
    parser.add_argument("--skip-library", action="store_true", help="no library comparison run")
    parser.add_argument("--out", default=None, help="JSON file or folder (default: $OUT or .)")
    args = parser.parse_args()
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.bases = args.bases or ["gguf"]
        args.shapes = args.shapes or ["tiny"]
        # A SmolLM2 step of 2 rows takes tens of seconds on a busy 2-core CPU.
        args.train_rows, args.val_rows, args.test_rows, args.synthetic_rows = 32, 4, 8, 24
        args.batch_size, args.micro_batch_size, args.max_steps = 2, 2, args.max_steps or 2
        args.burst_tokens, args.answer_tokens, args.job_timeout_s = 4, 4, 1200
    args.bases = args.bases or ["gguf", "optq-4", "optq-3", "quip#-2"]
    args.shapes = args.shapes or ["7b"]

    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="e2e-service-")))
        work.mkdir(parents=True, exist_ok=True)
        sampler = TreeSampler()
        sampler.start()
        stack.callback(sampler.stop)
        rows: list[dict] = []
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "work_dir")}

        def save() -> Path:
            """The JSON of the rows so far (the device stops a command after 10 minutes)."""
            found = dict(checks(rows, compare_library=not args.skip_library))
            payload = {"environment": environment(), "settings": settings, "rows": rows, "checks": found}
            return write_json("e2e_service.json", payload, args.out)

        if "smollm2" in args.models:
            run_smollm2(args, work, sampler, rows, save)
        for shape in args.shapes if "synthetic" in args.models else []:
            run_synthetic(args, work, sampler, shape, rows, save)

    print_table(rows, COLUMNS)
    found = checks(rows, compare_library=not args.skip_library)
    for name, ok in found:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"wrote {save()}")
    if not all(ok for _, ok in found):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The e2e benchmark's parts that run without a service: the chat files it writes from TREC and how
it splits memory between the worker's and the API's process trees."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from bench.e2e_service import TREC_LABELS, TreeSampler, _quantize_seconds, read_chat_rows, write_trec_chat

GIB = 2**30


def test_trec_chat_files_hold_each_split_with_its_label_word(tmp_path) -> None:
    raw = tmp_path / "datasets" / "trec"
    raw.mkdir(parents=True)
    rows = [{"sentence": f"Question {i} ?", "label": str(i % 6)} for i in range(12)]
    (raw / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (raw / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))

    paths = write_trec_chat(tmp_path / "datasets", tmp_path / "out", train_rows=8, val_rows=2, test_rows=2)

    train, validation, test = (read_chat_rows(paths[split]) for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (8, 2, 2)
    asked = [
        (messages[-1]["content"].rsplit("Question ", 1)[1], label) for messages, label in train + validation
    ]
    assert len({number for number, _ in asked}) == 10  # no question in both train and validation
    assert all(label == TREC_LABELS[int(number.split()[0]) % 6] for number, label in asked)
    assert [label for _, label in test] == ["description", "entity"]  # the test split, in its order
    again = write_trec_chat(tmp_path / "datasets", tmp_path / "again", 8, 2, 2)
    assert again["train"].read_text() == paths["train"].read_text()  # the shuffle is seeded


def test_sampler_counts_the_worker_tree_apart_from_the_api_tree(tmp_path) -> None:
    """A child whose command line names `worker` (as `python -m worker` does), with its own child,
    is the worker's tree; the serve process and its other children are the API's."""
    holder = tmp_path / "holder.py"  # 300 MiB touched, in the worker's child
    holder.write_text("import time\nx = b'x' * (300 * 2**20)\ntime.sleep(60)\n")
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(holder)!r}])\ntime.sleep(60)\n"
    )
    serve = tmp_path / "serve.py"
    serve.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(worker)!r}, 'worker'])\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, str(serve)], start_new_session=True)
    sampler = TreeSampler(interval_s=0.1)
    sampler.start()
    try:
        sampler.attach(process.pid)
        peaks: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while peaks.get("worker_rss", 0) < 300 * 2**20 / GIB and time.monotonic() < deadline:
            time.sleep(0.5)
            peaks = sampler.take() or peaks
    finally:
        sampler.stop()
        os.killpg(process.pid, signal.SIGKILL)
    assert peaks["worker_rss"] >= 300 * 2**20 / GIB
    assert 0 < peaks["api_rss"] < 200 * 2**20 / GIB  # two idle interpreters


def test_quantize_time_runs_from_the_quantizing_event_past_its_layer_progress() -> None:
    messages = ["Started on w", "Quantizing m with optq to 4 bits", "Quantizing layer 1 of 2",
                "Quantizing layer 2 of 2", "Loading the base model", "Files validated"]  # fmt: skip
    events = [SimpleNamespace(id=str(i), message=m) for i, m in enumerate(messages)]
    seen = {"0": 0.0, "1": 1.0, "2": 2.0, "3": 7.5, "4": 9.0, "5": 12.0}
    assert _quantize_seconds(events, seen) == 8.0
    assert _quantize_seconds([events[0], events[4]], seen) is None  # a cached or GGUF-native base

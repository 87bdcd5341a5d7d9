"""modulora/serve/budget.py and the engine under a memory budget: KV cache rows sized from the
model's config and weights, a clear refusal before loading a model that cannot fit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from modulora.serve.budget import ModelTooLarge, kv_bytes_per_token, plan_serving, workspace_bytes
from modulora.serve.engine import InferenceEngine, size_from_files
from modulora.serve.types import EngineConfig, EngineError, ModelSpec, SamplingParams
from tests.utils.model_folders import write_sharded_model

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000}  # fmt: skip
LLAMA_2_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000}  # fmt: skip
GIB = 1024**3


def test_kv_cache_per_token_counts_k_and_v_of_every_layer_and_kv_head() -> None:
    # LLaMA-7B: 32 layers x 32 heads x 128 dims, K and V, bf16.
    assert kv_bytes_per_token(LLAMA_7B, 2) == 2 * 32 * 32 * 128 * 2
    # Grouped-query attention stores only the KV heads (8 of 64).
    assert kv_bytes_per_token(LLAMA_2_70B, 2) == 2 * 80 * 8 * 128 * 2


def test_rows_are_the_most_that_fit_beside_weights_workspace_and_adapters() -> None:
    job = {"weights_bytes": int(3.9 * GIB), "dtype_bytes": 2, "max_seq_len": 2048, "adapter_bytes": 256 << 20}
    plan = plan_serving(LLAMA_7B, max_batch_size=16, budget_bytes=8 * GIB, **job)
    row = kv_bytes_per_token(LLAMA_7B, 2) * 2048
    assert 1 <= plan.rows < 16
    assert plan.total <= 8 * GIB < plan.total + row  # one more row would not fit
    assert plan.kv_cache_bytes == plan.rows * row
    assert plan.workspace_bytes == workspace_bytes(LLAMA_7B, 2048, 16, 2)
    # A larger budget is capped by max_batch_size; no budget means max_batch_size rows.
    assert plan_serving(LLAMA_7B, max_batch_size=16, budget_bytes=80 * GIB, **job).rows == 16
    assert plan_serving(LLAMA_7B, max_batch_size=16, budget_bytes=None, **job).rows == 16


def test_a_model_that_cannot_fit_one_row_is_refused_naming_every_term() -> None:
    with pytest.raises(ModelTooLarge) as refused:
        plan_serving(
            LLAMA_2_70B, weights_bytes=36 * GIB, dtype_bytes=2, max_batch_size=16, max_seq_len=4096,
            budget_bytes=24 * GIB, adapter_bytes=0, model="llama-2-70b",
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith("model: llama-2-70b does not fit the inference memory budget of 24.00 GiB")
    assert "weights 36.00 GiB" in message and "(4096 tokens)" in message


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_sharded_model(tmp_path / "tiny-llama")


def test_engine_refuses_a_base_over_the_budget_before_loading_it(folder: Path) -> None:
    loads: list[str] = []

    def load_base(ref: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        loads.append(ref)
        raise AssertionError("the base must not load")

    _, weights = size_from_files(str(folder), torch.float32)
    engine = InferenceEngine(
        EngineConfig(device="cpu", memory_budget_bytes=weights, max_seq_len=64),
        load_base=load_base,
        size_base=size_from_files,
    )
    try:
        with pytest.raises(EngineError) as refused:
            engine.complete(ModelSpec("tiny", str(folder)), SamplingParams(max_tokens=2), "Hi")
    finally:
        engine.shutdown()
    assert refused.value.code == "model_too_large" and refused.value.param == "model"
    assert "does not fit the inference memory budget" in refused.value.message
    assert loads == []


def test_engine_sizes_the_kv_cache_rows_to_its_budget(make_engine) -> None:
    probe = make_engine(max_batch_size=8)
    probe.complete(ModelSpec("tiny", "tiny"), SamplingParams(max_tokens=2, temperature=0), "Hi")
    base = probe.bases["tiny"]
    row = base.decoder.kv_cache_bytes // 8
    # Room for the weights, the working memory, the adapter reserve and three and a half rows.
    budget = base.decoder.base_bytes + base.plan.workspace_bytes + base.plan.adapter_bytes + 7 * row // 2
    engine = make_engine(max_batch_size=8, memory_budget_bytes=budget)
    texts, _ = engine.complete(ModelSpec("tiny", "tiny"), SamplingParams(max_tokens=2, temperature=0), "Hi")
    assert engine.memory()["rows"]["tiny"] == 3
    assert engine.memory()["kv_cache"]["tiny"] == 3 * row
    assert (
        texts
        == probe.complete(ModelSpec("tiny", "tiny"), SamplingParams(max_tokens=2, temperature=0), "Hi")[0]
    )
    # More choices than rows: a clear error, not a wait forever.
    with pytest.raises(EngineError, match="exceeds the 3 sequences this base decodes at once"):
        engine.complete(ModelSpec("tiny", "tiny"), SamplingParams(max_tokens=2, n=4), "Hi")


@pytest.mark.gpu
def test_on_a_gpu_the_engine_stays_inside_its_budget_and_queues_past_its_rows() -> None:
    """SmolLM2's own 4-bit blocks on CUDA, a budget that buys 3 rows of 1,024 tokens: 8 concurrent
    long requests all finish (the rest wait for rows) and the allocator never reserves more."""
    ref, dtype = "smollm2-135m-instruct:gguf", torch.bfloat16
    config, weights = size_from_files(ref, dtype)
    one_row = plan_serving(
        config, weights_bytes=weights, dtype_bytes=2, max_batch_size=1, max_seq_len=1024,
        budget_bytes=None, adapter_bytes=256 << 20,
    )  # fmt: skip
    row = one_row.kv_cache_bytes
    budget = weights + workspace_bytes(config, 1024, 8, 2) + (256 << 20) + 7 * row // 2
    engine = InferenceEngine(
        EngineConfig(device="cuda", max_batch_size=8, max_seq_len=1024, memory_budget_bytes=budget)
    )
    torch.cuda.reset_peak_memory_stats()
    prompt = "Tell me a long story about the sea. " * 60  # ~600 tokens: prefill near the planned size
    results: list[str] = []

    def ask() -> None:
        texts, _ = engine.complete(ModelSpec(ref, ref), SamplingParams(max_tokens=64, temperature=0), prompt)
        results.append(texts[0])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert engine.memory()["rows"][ref] == 3
    finally:
        engine.shutdown()
    assert len(results) == 8 and all(results)
    assert torch.cuda.max_memory_reserved() <= budget

"""How many KV cache rows a base gets under the engine's memory budget (torch-free arithmetic).

A resident base holds its weights, a KV cache of `rows` sequences of `max_seq_len` tokens, an
adapter bank, and transient working memory for a step. The budget pays for the weights, the
working memory and `adapter_bytes` for the bank first; what is left buys cache rows, at most
`max_batch_size`. A model whose weights and one row do not fit is refused (`ModelTooLarge`).

Per token the cache holds K and V for every layer and KV head: 2 · layers · kv_heads · head_dim
elements (LLaMA-7B in bf16: 0.5 MiB, so 2,048 tokens are 1 GiB a row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = 512 * 1024**2
"""The CUDA context and allocator slack of the process, outside any tensor."""


class ModelTooLarge(ValueError):
    """The base does not fit the memory budget even with one KV cache row."""


def kv_bytes_per_token(config: Mapping[str, Any], dtype_bytes: int) -> int:
    """Bytes of K and V over all layers for one token of one sequence (Hugging Face config keys)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def workspace_bytes(
    config: Mapping[str, Any], max_seq_len: int, max_batch_size: int, dtype_bytes: int
) -> int:
    """Transient memory of the largest step: a prompt of `max_seq_len` tokens through one layer
    (hidden states, q/k/v/o, gate/up/activation, attention scores of every head), one decoder
    linear materialized (formats without a fused product), float32 logits of a full batch, and
    the runtime overhead."""
    hidden, inner, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    prefill = max_seq_len * (6 * hidden + 3 * inner + heads * max_seq_len) * dtype_bytes
    materialized = hidden * inner * dtype_bytes
    logits = max_batch_size * config["vocab_size"] * 4
    return prefill + materialized + logits + RUNTIME_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """Bytes a resident base is planned to hold, and the KV cache rows that buys."""

    rows: int
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    adapter_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.adapter_bytes


def plan_serving(
    config: Mapping[str, Any],
    *,
    weights_bytes: int,
    dtype_bytes: int,
    max_batch_size: int,
    max_seq_len: int,
    budget_bytes: int | None,
    adapter_bytes: int,
    model: str = "the model",
) -> ServingPlan:
    """The rows (at most `max_batch_size`) of `max_seq_len` tokens that fit `budget_bytes` beside
    the weights, working memory and `adapter_bytes`; None: no budget, `max_batch_size` rows.
    Raises `ModelTooLarge` (naming every term) when not even one row fits."""
    row_bytes = kv_bytes_per_token(config, dtype_bytes) * max_seq_len
    workspace = workspace_bytes(config, max_seq_len, max_batch_size, dtype_bytes)
    rows = max_batch_size
    if budget_bytes is not None:
        fixed = weights_bytes + workspace + adapter_bytes
        rows = min(max_batch_size, max(budget_bytes - fixed, 0) // row_bytes)
        if rows < 1:
            raise ModelTooLarge(
                f"model: {model} does not fit the inference memory budget of {budget_bytes / GIB:.2f} GiB: "
                f"weights {weights_bytes / GIB:.2f} GiB + one sequence's KV cache ({max_seq_len} tokens) "
                f"{row_bytes / GIB:.2f} GiB + working memory {workspace / GIB:.2f} GiB + adapters "
                f"{adapter_bytes / GIB:.2f} GiB = {(fixed + row_bytes) / GIB:.2f} GiB; raise the budget, "
                "lower max_seq_len, or serve a smaller or lower-bit base"
            )
    return ServingPlan(rows, weights_bytes, rows * row_bytes, workspace, adapter_bytes)

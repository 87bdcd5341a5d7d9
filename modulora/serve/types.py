"""The engine's plain data: configuration, sampling parameters, prompts, what a model id serves.

Nothing here imports torch, so the API can build requests without the ML stack (the events a
request emits are in `modulora.serve.events`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

DEVICES = ("auto", "cpu", "cuda")
FinishReason = Literal["stop", "length"]
Prompt = str | list[dict[str, str]]
"""A raw text prompt, or chat messages ({"role", "content"}) rendered with the chat template."""
DTYPES = ("auto", "float32", "bfloat16", "float16")


class EngineError(Exception):
    """A request the engine cannot serve; `code` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "inference_error", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclasses.dataclass
class EngineConfig:
    """device/dtype: "auto" picks CUDA + bfloat16 when a GPU is visible, else CPU + float32.
    max_batch_size: sequences decoded together per base (rows of its KV cache).
    max_seq_len: prompt + completion tokens per sequence (length of each KV cache row).
    memory_budget_bytes: bases + KV caches + adapter banks + working memory. A base's KV cache
        gets the rows (up to max_batch_size) that fit beside its weights, working memory and
        `adapter_memory_bytes` (`modulora.serve.budget`); a base that does not fit with one row is
        refused. Least-recently-used idle adapters, then idle bases, are evicted to stay under it.
        None = no limit. On a GPU shared with training, set it to what training leaves free.
    adapter_memory_bytes: kept free for each base's adapter bank when its cache is sized (a
        rank-16 adapter on every linear of LLaMA-7B takes 80 MiB in bf16).
    """

    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_seq_len: int = 2048
    memory_budget_bytes: int | None = None
    adapter_memory_bytes: int = 256 * 1024**2

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device!r} is not one of {list(DEVICES)} or 'cuda:<index>'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size: {self.max_batch_size} must be positive")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len: {self.max_seq_len} must be positive")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes: {self.memory_budget_bytes} must be positive or None")
        if self.adapter_memory_bytes < 0:
            raise ValueError(f"adapter_memory_bytes: {self.adapter_memory_bytes} must not be negative")


@dataclasses.dataclass
class SamplingParams:
    """How to pick the tokens of one request, for the engine and `modulora.generate` alike.

    The defaults are OpenAI's (temperature 1, top_p 1, one choice); the CLI and library callers pass
    their own. temperature 0 is greedy; otherwise top_k (0: off), then top_p filter the distribution.
    Choice i samples from its own generator seeded with `seed + i`, so a seeded request repeats.
    A choice ends at EOS, before a stop string, or after max_tokens.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens: {self.max_tokens} must be positive")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature: {self.temperature} must be in [0, 2]")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k} must not be negative")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop: at most 4 non-empty strings")
        if not 1 <= self.n <= 16:
            raise ValueError(f"n: {self.n} must be in [1, 16]")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a `model` id serves: a base (a `modulora.models.load_model` ref) and maybe an adapter.

    checkpoint_scaling: set when `adapter_dir` is a training checkpoint (no adapter_config.json).
    """

    id: str
    base: str
    adapter_dir: Path | None = None
    checkpoint_scaling: float | None = None

"""The base a fine-tuning job trains on, named one way for the worker (which builds it) and the API
(which serves a job's checkpoints, possibly before the job has finished).

The library is imported inside the functions: it brings torch, which the API loads only to serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modulora.quant import QuantConfig


def job_quant_config(hyperparameters: dict[str, Any]) -> QuantConfig | None:
    """How the job's base is quantized; None for a GGUF-native base (the model's own blocks).

    The calibration seed is the library's default, not the job's: a base is a function of the model
    and the quantization alone, so jobs that differ in anything else share it.
    """
    if hyperparameters["quantization"] == "gguf":
        return None
    from modulora.quant import QuantConfig

    return QuantConfig(
        method=hyperparameters["quantization"],
        bits=hyperparameters["bits"],
        group_size=hyperparameters["group_size"],
    )


def job_base(model: str, hyperparameters: dict[str, Any]) -> str:
    """The reference `modulora.models.load_model` takes for the job's base: `<model>:gguf`, or the
    quantized folder under `bases/` (present once a worker has built it)."""
    from modulora.models import NATIVE_GGUF_SUFFIX, quantized_base_dir

    config = job_quant_config(hyperparameters)
    return f"{model}{NATIVE_GGUF_SUFFIX}" if config is None else str(quantized_base_dir(model, config))

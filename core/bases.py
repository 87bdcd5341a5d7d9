"""The base a fine-tuning job trains on, named one way for the worker (which builds it) and the API
(which serves a job's checkpoints, possibly before the job has finished).

The library is imported inside the functions: it brings torch, which the API loads only to serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modulora.quant import QuantConfig


def job_quant_config(hyperparameters: dict[str, Any], training_file: str | None = None) -> QuantConfig | None:
    """How the job's base is quantized; None for a GGUF-native base (the model's own blocks).

    The calibration seed is the library's default, not the job's: a base is a function of the model,
    the quantization and, for quantizers that calibrate, the calibration file alone, so jobs that
    differ in anything else share it. The calibration size is left to the quantizing device
    (`modulora.quantize.calibration_size`), so the API names the same folder as any worker.
    """
    if hyperparameters["quantization"] == "gguf":
        return None
    from modulora.quant import QuantConfig, get_quantizer

    config = QuantConfig(
        method=hyperparameters["quantization"],
        bits=hyperparameters["bits"],
        group_size=hyperparameters["group_size"],
    )
    if get_quantizer(config).needs_hessian:
        config.calibration = job_calibration_file(hyperparameters, training_file)
    return config


def job_calibration_file(hyperparameters: dict[str, Any], training_file: str | None) -> str | None:
    """The stored file whose text calibrates the job's base, or None for the library's C4 sample.

    hyperparameters["calibration"]: "default", "training_file" or a file id (absent in jobs
    created before it existed: "default").
    """
    choice = hyperparameters.get("calibration", "default")
    if choice == "default":
        return None
    file_id = training_file if choice == "training_file" else choice
    if file_id is None:
        raise ValueError("training_file: needed when hyperparameters.calibration is 'training_file'")
    from core.config import get_settings

    return str(get_settings().files_dir / file_id)


def job_base(model: str, hyperparameters: dict[str, Any], training_file: str | None = None) -> str:
    """The reference `modulora.models.load_model` takes for the job's base: `<model>:gguf`, or the
    quantized folder under `bases/` (present once a worker has built it)."""
    from modulora.models import NATIVE_GGUF_SUFFIX, quantized_base_dir

    config = job_quant_config(hyperparameters, training_file)
    return f"{model}{NATIVE_GGUF_SUFFIX}" if config is None else str(quantized_base_dir(model, config))

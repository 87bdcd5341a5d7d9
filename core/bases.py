"""The base a fine-tuning job trains on, named one way for the worker (which builds it) and the API
(which serves a job's checkpoints, possibly before the job has finished).

A job names its base model by the name the API shows (a key of MODULORA_BASE_MODELS); the library
gets the source that name maps to. The library is imported inside the functions: it brings torch,
which the API loads only to serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import get_settings

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
    """The reference `modulora.models.load_model` takes for the job's base: `<source>:gguf`, or the
    quantized folder under `bases/` (present once a worker has built it), named after `model`."""
    from modulora.models import NATIVE_GGUF_SUFFIX, quantized_base_dir

    source = base_model_source(model)
    config = job_quant_config(hyperparameters, training_file)
    if config is None:
        return f"{source}{NATIVE_GGUF_SUFFIX}"
    return str(quantized_base_dir(_identity(model, source), config, label=model))


def _identity(name: str, source: str) -> str:
    """What keys a model's quantized bases: its source as configured, so hosts that mount the
    models or keep the Hugging Face cache elsewhere name the same base; a Hugging Face id with
    the snapshot it resolved to, so a new revision gets a new base."""
    configured = get_settings().base_models[name]
    if configured == source or Path(configured).expanduser().exists():
        return configured
    return f"{configured}@{Path(source).name}"


def base_model_source(name: str) -> str:
    """The library reference of a base model named in MODULORA_BASE_MODELS: a built-in name as it
    is, else the folder or .gguf file its source names (a Hugging Face id resolved from the local
    cache). Raises `ModelFolderError` (a ValueError) for an unknown name or a missing source."""
    from modulora.model_folder import ModelFolderError, find_model

    sources = get_settings().base_models
    if name not in sources:
        raise ModelFolderError(f"model: {name!r} is not one of {sorted(sources)}")
    source = sources[name]
    return source if is_builtin(source) else str(find_model(source))


def is_builtin(source: str) -> bool:
    """A source without a path separator that is not a file here names one of the library's
    built-in models (`modulora.models.BUILTIN_MODELS`, which checks the name when loading)."""
    return "/" not in source and not Path(source).expanduser().exists()


def check_base_model(name: str, quantization: str | None = None) -> None:
    """Refuse a base model whose source is not a usable model (`modulora.model_folder.check_model`),
    or, for `quantization="gguf"` (train on the model's own blocks), one that is not a GGUF;
    built-in models are checked by their package."""
    from modulora.model_folder import ModelFolderError, check_model, gguf_file

    source = base_model_source(name)
    if is_builtin(source):
        return
    check_model(Path(source))
    if quantization == "gguf" and gguf_file(Path(source)) is None:
        raise ModelFolderError(
            f"model: {name!r} is not a GGUF model, so it has no blocks of its own to train on; "
            "choose another quantization (optq, rtn, nf4, quip#)"
        )


def base_model_problem(name: str) -> str | None:
    """Why the base model cannot be used on this host (`check_base_model`'s message), or None."""
    from modulora.model_folder import ModelFolderError

    try:
        check_base_model(name)
    except ModelFolderError as e:
        return str(e)
    return None


def base_model_folder(name: str) -> Path:
    """The folder holding the base model's config.json and tokenizer: a built-in model's converted
    copy under `models/` (present once converted), else the source folder itself."""
    source = base_model_source(name)
    return get_settings().models_dir / source if is_builtin(source) else Path(source)

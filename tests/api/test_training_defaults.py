"""One training configuration: the API's hyperparameters, the CLI's options and the library's
TrainConfig start from the same defaults, and the worker trains with what the job says."""

from __future__ import annotations

import pytest

from api.schemas import Hyperparameters
from modulora import cli
from modulora.train import TrainConfig

SHARED = ("schedule", "warmup_ratio", "weight_decay", "packing", "max_seq_len", "lora_r", "lora_alpha",
          "lora_dropout", "n_epochs")  # fmt: skip
CLI_NAMES = {"n_epochs": "epochs"}


def test_api_cli_and_library_share_the_training_defaults() -> None:
    api = Hyperparameters().resolve(train_rows=100)
    finetune = cli.build_parser().parse_args(["finetune"])
    train = TrainConfig()
    for name in SHARED:
        assert api[name] == getattr(finetune, CLI_NAMES.get(name, name)), name
    for name in ("schedule", "warmup_ratio", "weight_decay", "packing", "max_seq_len"):
        assert getattr(train, name) == api[name], name
    assert finetune.learning_rate == train.learning_rate


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"schedule": "step"}, "schedule"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"weight_decay": -1}, "weight_decay"),
    ],
)
def test_bad_schedule_settings_are_rejected_naming_the_field(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Hyperparameters.model_validate(extra)


def test_worker_trains_with_the_jobs_schedule(tmp_path) -> None:
    from types import SimpleNamespace

    import torch

    from worker.tasks.train import _train_config

    hp = Hyperparameters(schedule="constant", warmup_ratio=0.1, weight_decay=0.01, packing=True).resolve(10)
    job = SimpleNamespace(hyperparameters=hp, seed=0)
    config = _train_config(job, tmp_path, torch.device("cpu"), hp["micro_batch_size"])
    assert (config.schedule, config.warmup_ratio, config.weight_decay, config.packing) == (
        "constant",
        0.1,
        0.01,
        True,
    )

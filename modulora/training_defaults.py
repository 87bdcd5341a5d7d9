"""The training defaults every entry point shares, so one dataset trains the same way by every route:
the library's `TrainConfig`, the `modulora finetune` flags (and `--config` files), the API's
`hyperparameters` and the dashboard's new-job form (through `/dashboard/options`). No torch here:
the API reads it.
"""

from __future__ import annotations

LEARNING_RATE = 2e-4
"""The usual LoRA learning rate; the API's `learning_rate_multiplier` scales it."""
N_EPOCHS = 3
SCHEDULES = ("cosine", "linear", "constant")
SCHEDULE = "cosine"
"""Learning-rate decay after warmup (to 0 for cosine and linear)."""
WARMUP_RATIO = 0.03
"""Fraction of the steps spent warming the learning rate up from near 0."""
WEIGHT_DECAY = 0.0
PACKING = False
"""Concatenate examples into full `max_seq_len` sequences (fewer pad tokens)."""
MAX_SEQ_LEN = 512
LORA_R = 16
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.05


def as_dict() -> dict[str, object]:
    """The defaults by the API's hyperparameter names (what the dashboard's form starts from)."""
    return {
        "n_epochs": N_EPOCHS,
        "learning_rate": LEARNING_RATE,
        "schedule": SCHEDULE,
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": WEIGHT_DECAY,
        "packing": PACKING,
        "max_seq_len": MAX_SEQ_LEN,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
    }

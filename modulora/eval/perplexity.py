"""Perplexity over non-overlapping fixed windows (the GPTQ / OPTQ evaluation protocol).

The text is tokenized once (no special tokens), cut into `len(ids) // window` windows of exactly
`window` tokens (the remainder is dropped), and every window is scored on its own: token t is
predicted from tokens < t of the same window. Perplexity = exp(total NLL / predicted tokens).

WikiText-2 as specified in issue 2: `wiki.test.raw` with CRLF read as LF, the first 87,684
characters: 22,014 SmolLM2 tokens, 42 windows of 512 (`load_wikitext2(path)`). The text is not
shipped with the package: callers pass its path (the tests and benchmarks read `../shared`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WIKITEXT2_CHARS = 87_684


def load_wikitext2(path: str | os.PathLike[str], max_chars: int | None = WIKITEXT2_CHARS) -> str:
    """WikiText-2 test text at `path` with CRLF read as LF, cut to its first `max_chars` characters."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    return text if max_chars is None else text[:max_chars]


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """exp(mean next-token NLL) over non-overlapping `window`-token windows of `text`."""
    if window < 2:
        raise ValueError(f"window: {window} must be at least 2 tokens")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    n_windows = len(ids) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text: {len(ids)} tokens do not fill one window of {window}")
    windows = ids[: n_windows * window].view(n_windows, window)
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, window - 1, vocab]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)

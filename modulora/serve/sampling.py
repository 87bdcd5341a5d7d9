"""Picking the next token: greedy, or sampled after top-k and top-p filtering, one generator a choice.

The engine and `modulora.generate` both call `next_tokens`, so the same logits and `SamplingParams`
give the same token wherever they are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modulora.serve.types import SamplingParams


def choice_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """The random generator of choice `index`: seeded with `seed + index`, or from the OS without a
    seed; None when greedy. Its own generator keeps a choice's tokens independent of its batch."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + index)
    return generator


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id sampled from logits [vocab] at params.temperature > 0, after top-k and top-p."""
    logits = logits.float().cpu() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """The next token of every row of logits [rows, vocab], row i under params[i] and generators[i].

    Greedy rows share one argmax and one device-to-host copy for the whole batch.
    """
    tokens = logits.argmax(-1).tolist()
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.temperature > 0:
            tokens[row] = _sample(logits[row], row_params, generator)
    return tokens

"""One generated sequence: sampling, incremental detokenization and stop strings.

Text is decoded incrementally over a short window of tokens (the way vLLM and TGI do it), so each
step costs the same however long the completion is, and a character split across tokens is held
back until it is whole. With stop strings, the last `len(longest stop) - 1` characters are held back
too, so a stop string is never streamed in part.
"""

from __future__ import annotations

from typing import Any

import torch

from modulora.serve.types import SamplingParams


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from logits [vocab] (float32): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Sequence:
    """The state of one choice of one request while it sits in a KV cache row."""

    def __init__(
        self, index: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Any, eos_ids: set[int]
    ) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed + index if params.seed is not None else torch.seed())
        self.row = -1  # KV cache row
        self.slot = 0  # adapter bank slot (0: the base alone)
        self.output_ids: list[int] = []
        self.text = ""  # decoded so far (stop strings not yet cut)
        self.emitted = 0  # characters of `text` already streamed
        self._prefix_offset = 0
        self._read_offset = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Tokens in this row's cache before the next forward (prompt + all outputs but the last)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(self, token: int, cache_full: bool) -> str:
        """Add a sampled token; returns the new text to stream and sets `finish_reason` when done."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush(len(self.text))
        self.output_ids.append(token)
        self._decode_new()
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.finish_reason = "stop"
                return self._flush(at)
        if len(self.output_ids) >= self.params.max_tokens or cache_full:
            self.finish_reason = "length"
            return self._flush(len(self.text))
        return self._flush(len(self.text) - self._hold)

    def _decode_new(self) -> None:
        ids = self.output_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _flush(self, end: int) -> str:
        if self.finish_reason is not None:
            self.text = self.text[:end]
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

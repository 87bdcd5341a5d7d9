"""One generated sequence: prompt ids, end-of-sequence ids, stop strings and incremental detokenization.

Text is decoded incrementally over a short window of tokens (the way vLLM and TGI do it), so each
step costs the same however long the completion is, and a character split across tokens is held
back until it is whole. With stop strings, the last `len(longest stop) - 1` characters are held back
too, so a stop string is never streamed in part. The engine and `modulora.generate` both run their
choices through `SequenceState`, so they end and cut a completion the same way.
"""

from __future__ import annotations

from typing import Any

from modulora.data import chat_template
from modulora.serve.sampling import choice_generator
from modulora.serve.types import FinishReason, Prompt, SamplingParams


def encode_prompt(tokenizer: Any, prompt: Prompt, template: str | None = None) -> list[int]:
    """Token ids of a text prompt, or of chat messages rendered with a generation prompt, exactly as
    training builds them (no added special tokens). `template`: a chat template saved with an
    adapter, used instead of the tokenizer's own."""
    if not isinstance(prompt, str):
        prompt = tokenizer.apply_chat_template(
            prompt,
            chat_template=template or chat_template(tokenizer),
            tokenize=False,
            add_generation_prompt=True,
        )
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Ids that end a sequence: the tokenizer's EOS and every EOS of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


class SequenceState:
    """The state of one choice of one request while it generates."""

    def __init__(
        self, index: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Any, eos_ids: set[int]
    ) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generator = choice_generator(params, index)
        self.output_ids: list[int] = []
        self.text = ""  # decoded so far (stop strings not yet cut)
        self.emitted = 0  # characters of `text` already streamed
        self._prefix_offset = 0
        self._read_offset = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.finish_reason: FinishReason | None = None

    @property
    def position(self) -> int:
        """Tokens in this row's cache before the next forward (prompt + all outputs but the last)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(self, token: int, cache_full: bool = False) -> str:
        """Add a sampled token; returns the new text to stream and sets `finish_reason` when done.

        EOS ends the choice without joining its ids or text. `cache_full`: no room for another token.
        """
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush(len(self.text))
        self.output_ids.append(token)
        self._decode_new()
        # A stop string can only be new where it overlaps text not streamed yet.
        found = [self.text.find(stop, max(0, self.emitted - len(stop))) for stop in self.params.stop]
        if any(at != -1 for at in found):
            self.finish_reason = "stop"
            return self._flush(min(at for at in found if at != -1))
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

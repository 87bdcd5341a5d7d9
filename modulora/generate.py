"""Text generation with a KV cache: greedy or sampled, batched with left padding, or streamed.

    completions = generate(model, tokenizer, ["Question: ...\\nType:"], max_new_tokens=8)
    for delta in stream_generate(model, tokenizer, [{"role": "user", "content": "hi"}]):
        print(delta, end="")

Works on any Hugging Face causal LM, including quantized bases with unfused LoRA adapters (the
adapter runs beside the re-materialized base weight). Prompts are tokenized without special tokens,
like training examples; a prompt given as a list of chat messages goes through the chat template.
temperature 0 is greedy; otherwise top-k, then top-p filter the distribution before sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from modulora.data import chat_template

Prompt = str | list[dict[str, str]]


@dataclasses.dataclass
class SamplingConfig:
    """max_new_tokens; temperature (0 = greedy); top_p in (0, 1]; top_k (0 = off); stop strings; seed."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature: {self.temperature} must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k} must not be negative")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a text prompt, or of chat messages rendered with a generation prompt."""
    if not isinstance(prompt, str):
        prompt = tokenizer.apply_chat_template(
            prompt, chat_template=chat_template(tokenizer), tokenize=False, add_generation_prompt=True
        )
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= (
        set(configured)
        if isinstance(configured, list)
        else ({configured} if configured is not None else set())
    )
    return ids


def _next_tokens(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [batch, vocab] (float32) -> next token ids [batch]."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first token always stays).
        drop = probs.cumsum(dim=-1) - probs > config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def _decode(
    model: nn.Module, prompt_ids: list[list[int]], pad_id: int, config: SamplingConfig, eos: set[int]
) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence [batch] per step; the caller decides when to stop."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), longest), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):  # left padding: every sequence ends at the last column
        input_ids[i, longest - len(ids) :] = torch.tensor(ids)
        attention_mask[i, longest - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    cache = DynamicCache()
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    for _ in range(config.max_new_tokens):
        logits = (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )  # [batch, vocab]
        tokens = _next_tokens(logits, config, generator)
        yield tokens
        input_ids = tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompt_ids), 1)], dim=1)


def _find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits, default=-1)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    config: SamplingConfig | None = None,
    **overrides: Any,
) -> list[Completion]:
    """Complete every prompt (texts or chat message lists) in one left-padded batch.

    Sampling settings come from `config` or keyword overrides (max_new_tokens=..., temperature=...).
    A completion ends at EOS (not included in the text), at a stop string (cut before it) or at
    max_new_tokens ("length").
    """
    config = dataclasses.replace(config or SamplingConfig(), **overrides)
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts: pass a list of prompts (a text or a list of chat messages each)")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("prompts: every prompt needs at least one token")
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    generated: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    finish: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for tokens in _decode(model, prompt_ids, pad_id, config, eos):
        for i, token in enumerate(tokens.tolist()):
            if finish[i] is not None:
                continue
            if token in eos:
                finish[i] = "stop"
                continue
            generated[i].append(token)
            if config.stop:
                texts[i] = tokenizer.decode(generated[i], skip_special_tokens=True)
                if _find_stop(texts[i], config.stop) >= 0:
                    finish[i] = "stop"
        if all(f is not None for f in finish):
            break
    model.train(was_training)
    completions = []
    for ids, reason, n_prompt in zip(generated, finish, map(len, prompt_ids), strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = _find_stop(text, config.stop) if config.stop else -1
        completions.append(Completion(text[:cut] if cut >= 0 else text, ids, reason or "length", n_prompt))
    return completions


def stream_generate(
    model: nn.Module, tokenizer: Any, prompt: Prompt, config: SamplingConfig | None = None, **overrides: Any
) -> Iterator[str]:
    """Yield text deltas of one completion as tokens arrive; their concatenation equals `generate`'s text.

    Text that may be the start of a stop string, or an incomplete UTF-8 character, is held back
    until the next token decides it.
    """
    config = dataclasses.replace(config or SamplingConfig(), **overrides)
    prompt_ids = [encode_prompt(tokenizer, prompt)]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    generated: list[int] = []
    emitted = 0
    was_training = model.training
    model.eval()
    try:
        for tokens in _decode(model, prompt_ids, pad_id, config, eos):
            token = int(tokens[0])
            if token in eos:
                break
            generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            cut = _find_stop(text, config.stop)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - _held_back(text, config.stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > emitted:
            yield text[emitted:]
    finally:
        model.train(was_training)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters to keep back: a partial UTF-8 character or a stop-string prefix."""
    if text.endswith("\ufffd"):
        return 1
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

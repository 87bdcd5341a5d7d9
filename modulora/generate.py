"""Generation on a model in memory, for evaluating a model under training (LoRA modules attached).

    greedy = SamplingParams(max_tokens=8, temperature=0)
    completions = generate(model, tokenizer, ["Question: ...\\nType:"], greedy)

Served models (a base and an exported adapter) generate on the engine (`modulora.serve`, which the
`modulora generate` command and the HTTP API use). This helper runs any Hugging Face causal LM
instead, quantized or not, with the adapter beside the re-materialized base weight, but picks and
ends tokens with the engine's own code: `modulora.serve.sampling.next_tokens` and
`modulora.serve.sequence.SequenceState` (EOS, stop strings, max_tokens, detokenization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from modulora.serve.sampling import next_tokens
from modulora.serve.sequence import SequenceState, encode_prompt, eos_token_ids
from modulora.serve.types import FinishReason, Prompt, SamplingParams


@dataclasses.dataclass
class GeneratedText:
    """One choice of one prompt: its text (stop string cut), token ids (EOS excluded) and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], params: SamplingParams
) -> list[GeneratedText]:
    """Complete every prompt (a text or a list of chat messages) in one left-padded batch with a KV
    cache; `params.n` choices each, prompt by prompt."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts: pass a list of prompts (a text or a list of chat messages each)")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("prompts: every prompt needs at least one token")
    eos = eos_token_ids(model, tokenizer)
    states = [
        SequenceState(index, ids, params, tokenizer, eos) for ids in prompt_ids for index in range(params.n)
    ]
    was_training = model.training
    model.eval()
    try:
        _decode(model, states)
    finally:
        model.train(was_training)
    return [
        GeneratedText(s.text, s.output_ids, s.finish_reason or "length", len(s.prompt_ids)) for s in states
    ]


def _decode(model: nn.Module, states: list[SequenceState]) -> None:
    """Run the model until every state has finished, one token per unfinished state a step."""
    device = next(model.parameters()).device
    longest = max(len(s.prompt_ids) for s in states)
    # Left padding: every row's last prompt token sits in the last column. Padded positions are
    # masked out, so the id they hold (0) is never attended to.
    input_ids = torch.zeros((len(states), longest), dtype=torch.long)
    attention_mask = torch.zeros((len(states), longest), dtype=torch.long)
    for row, state in enumerate(states):
        input_ids[row, longest - len(state.prompt_ids) :] = torch.tensor(state.prompt_ids)
        attention_mask[row, longest - len(state.prompt_ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache()
    while True:
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        tokens = next_tokens(
            output.logits[:, -1].float(), [s.params for s in states], [s.generator for s in states]
        )
        for state, token in zip(states, tokens, strict=True):
            if state.finish_reason is None:
                state.append(token)
        if all(s.finish_reason is not None for s in states):
            return
        input_ids = torch.tensor(tokens, device=device)[:, None]
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(states), 1)], dim=1)

"""Task metrics: classification accuracy by label log-likelihood, exact match, ROUGE, validation loss.

Every function takes the model as it is (quantized base + unfused LoRA works) and runs without grad.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulora.data import IGNORE_INDEX, Row, collate, pad_token_id
from modulora.eval.rows import choice_groups
from modulora.loss import autocast, completion_loss, label_logits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(
    model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `examples` on the model's device."""
    device, pad_id = _device(model), pad_token_id(tokenizer)
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}


def _labelled_logits(
    model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], batch_size: int, dtype: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: (next-token targets [b, t-1], their label mask, float logits at the labelled
    positions [n_labels, vocab]). The vocabulary projection runs on labelled positions only."""
    for batch in _batches(model, tokenizer, examples, batch_size):
        with autocast(dtype, batch["input_ids"].device):
            targets, mask, logits = label_logits(model, batch)
            logits = logits.float()
        yield targets, mask, logits


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    batch_size: int = 8,
    dtype: str = "fp32",
) -> float:
    """Mean cross-entropy per label token over `examples` (from `modulora.data.build_examples`)."""
    if not examples:
        raise ValueError("examples: empty")
    was_training = model.training
    model.eval()
    device, total, count = _device(model), 0.0, 0
    for batch in _batches(model, tokenizer, examples, batch_size):
        with autocast(dtype, device):
            loss_sum, n = completion_loss(model, batch)
        total += loss_sum.item()
        count += n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    batch_size: int = 16,
    dtype: str = "fp32",
) -> list[float]:
    """Summed log-probability of each example's label tokens given the tokens before them."""
    device, scores = _device(model), []
    for targets, mask, logits in _labelled_logits(model, tokenizer, examples, batch_size, dtype):
        token_logprobs = -F.cross_entropy(logits, targets[mask], reduction="none")
        rows = mask.nonzero()[:, 0]  # the example each label token belongs to
        per_example = torch.zeros(len(targets), device=device).index_add_(0, rows, token_logprobs)
        scores.extend(per_example.tolist())
    return scores


def choice_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    batch_size: int = 16,
    dtype: str = "fp32",
) -> torch.Tensor:
    """log p(choice | prompt) for every pair [len(prompts), len(choices)]; prompt and choice are
    tokenized separately and concatenated, as a completion follows its prompt in training."""
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not ids for ids in choice_ids):
        raise ValueError("choices: every choice must have at least one token")
    if all(len(ids) == 1 for ids in choice_ids):
        # One-token labels: a single forward per prompt reads every choice's log-probability.
        first_tokens = torch.tensor([ids[0] for ids in choice_ids])
        examples = [{"input_ids": ids + [0], "labels": [IGNORE_INDEX] * len(ids) + [0]} for ids in prompt_ids]
        return _next_token_logprobs(model, tokenizer, examples, batch_size, dtype)[:, first_tokens]
    examples = [
        {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p in prompt_ids for c in choice_ids
    ]
    scores = sequence_logprobs(model, tokenizer, examples, batch_size, dtype)
    return torch.tensor(scores).view(len(prompts), len(choices))


@torch.no_grad()
def _next_token_logprobs(
    model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], batch_size: int, dtype: str
) -> torch.Tensor:
    """Log-softmax over the vocabulary at each example's single labelled position [n, vocab]."""
    rows = []
    for _, _, logits in _labelled_logits(model, tokenizer, examples, batch_size, dtype):
        rows.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(rows)


def accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    labels: Sequence[int],
    batch_size: int = 16,
    dtype: str = "fp32",
) -> float:
    """Fraction of prompts whose most likely choice string is `choices[label]`."""
    if len(prompts) != len(labels):
        raise ValueError(f"labels: {len(labels)} labels for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    predictions = choice_scores(model, tokenizer, prompts, choices, batch_size, dtype).argmax(dim=1)
    model.train(was_training)
    return (predictions == torch.tensor(list(labels))).float().mean().item()


def row_accuracy(
    model: nn.Module, tokenizer: Any, rows: Sequence[Row], batch_size: int = 16, dtype: str = "fp32"
) -> float:
    """`accuracy` over rows `{prompt, choices, label}` (`modulora.eval.rows`), rows that share a
    choice list scored together."""
    groups = choice_groups(rows)
    correct = sum(
        accuracy(model, tokenizer, prompts, list(choices), labels, batch_size, dtype) * len(prompts)
        for choices, (prompts, labels) in groups.items()
    )
    return correct / len(rows)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference (after `normalize_answer` by default)."""
    if len(predictions) != len(references):
        raise ValueError(f"references: {len(references)} references for {len(predictions)} predictions")
    if not predictions:
        raise ValueError("predictions: empty")
    prepare = normalize_answer if normalize else str.strip
    return sum(prepare(p) == prepare(r) for p, r in zip(predictions, references, strict=True)) / len(
        predictions
    )


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge-score, with stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"references: {len(references)} references for {len(predictions)} predictions")
    if not predictions:
        raise ValueError("predictions: empty")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            totals[key] += score.fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}

"""Perplexity over non-overlapping windows, and the issue's WikiText-2 slice."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modulora.eval.perplexity import WIKITEXT2_CHARS, load_wikitext2, perplexity
from modulora.models import load_tokenizer


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same everywhere: softmax(logits)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        self.seen.append(tuple(ids.shape))
        return SimpleNamespace(logits=self.logits.expand(*ids.shape, -1))


class CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) % 8 for c in text])


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size() -> None:
    value = perplexity(FixedLogits(torch.zeros(8)), CharTokenizer(), "abcdefgh" * 20, window=16)
    assert value == pytest.approx(8.0, rel=1e-6)


def test_windows_do_not_overlap_and_the_remainder_is_dropped() -> None:
    model = FixedLogits(torch.zeros(8))
    perplexity(model, CharTokenizer(), "x" * 50, window=16, batch_size=2)  # 50 tokens: 3 windows of 16
    assert model.seen == [(2, 16), (1, 16)]
    model.seen.clear()
    perplexity(model, CharTokenizer(), "x" * 50, window=16, max_windows=1)
    assert model.seen == [(1, 16)]


def test_perplexity_is_exp_of_the_mean_nll_of_predicted_tokens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    text = "\x00\x01" * 8  # tokens 0,1,0,1,...: the first of each window is not predicted
    value = perplexity(FixedLogits(logits), CharTokenizer(), text, window=4)
    # Predicted tokens per window: 1, 0, 1 -> NLL ln4, ln2, ln4.
    assert value == pytest.approx(math.exp((2 * math.log(4) + math.log(2)) / 3), rel=1e-5)


def test_text_shorter_than_a_window_names_the_problem() -> None:
    with pytest.raises(ValueError, match="window"):
        perplexity(FixedLogits(torch.zeros(8)), CharTokenizer(), "short", window=16)


@pytest.mark.slow
def test_wikitext2_slice_is_22014_smollm2_tokens(smollm2, shared_datasets) -> None:
    text = load_wikitext2(shared_datasets / "wikitext2" / "wiki.test.raw")
    assert len(text) == WIKITEXT2_CHARS and "\r" not in text
    assert len(load_tokenizer(smollm2)(text, add_special_tokens=False).input_ids) == 22_014

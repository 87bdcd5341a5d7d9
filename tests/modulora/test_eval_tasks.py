"""Task metrics: accuracy by label likelihood, exact match, ROUGE, validation loss."""

import pytest
import torch
from utils.tiny_lm import single_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from modulora.data import build_examples, collate
from modulora.eval.tasks import accuracy, choice_scores, exact_match, rouge, validation_loss
from modulora.loss import completion_loss

PROMPTS = ["Question: Who wrote Hamlet?\nType:", "Question: What is the capital of France?\nType:", "hello"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@torch.no_grad()
def full_sequence_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(choice, add_special_tokens=False)["input_ids"]
    logprobs = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(p) - 1 + i, token].item() for i, token in enumerate(c))


@pytest.mark.parametrize(
    "choices", [[" human", " location", " number"], [" human being", " a location", " 42"]]
)
def test_choice_scores_equal_full_sequence_log_likelihood(model, tokenizer, choices) -> None:
    # One-token choices take the single-forward path, multi-token ones score every pair.
    scores = choice_scores(model, tokenizer, PROMPTS, choices, batch_size=2)
    expected = torch.tensor(
        [[full_sequence_logprob(model, tokenizer, p, c) for c in choices] for p in PROMPTS]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_accuracy_counts_the_argmax_choice(model, tokenizer) -> None:
    choices = [" human", " location", " number"]
    predicted = choice_scores(model, tokenizer, PROMPTS, choices).argmax(1).tolist()
    assert accuracy(model, tokenizer, PROMPTS, choices, predicted) == 1.0
    wrong = [(p + 1) % 3 for p in predicted]
    assert accuracy(model, tokenizer, PROMPTS, choices, wrong) == 0.0
    assert accuracy(model, tokenizer, PROMPTS, choices, predicted[:2] + wrong[2:]) == pytest.approx(2 / 3)


def test_validation_loss_is_the_mean_label_token_loss(model, tokenizer) -> None:
    rows = [{"prompt": p, "completion": " human"} for p in PROMPTS]
    examples = build_examples(rows, "auto", tokenizer, 64)
    loss_sum, count = completion_loss(model, collate(examples, tokenizer.pad_token_id))
    assert validation_loss(model, tokenizer, examples, batch_size=2) == pytest.approx(
        loss_sum.item() / count, rel=1e-5
    )


def test_exact_match_normalizes_case_punctuation_and_articles() -> None:
    assert exact_match(["The Paris.", "london", "x"], ["paris", "London!", "y"]) == pytest.approx(2 / 3)
    assert exact_match(["The Paris."], ["paris"], normalize=False) == 0.0


def test_rouge_is_one_for_identical_text_and_partial_otherwise() -> None:
    assert rouge(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigram overlap 3 of 3 predicted and 3 of 6 reference tokens: F1 = 2/3
    assert scores["rouge1"] == pytest.approx(2 / 3) and 0 < scores["rouge2"] < 1


def test_metrics_reject_length_mismatch() -> None:
    with pytest.raises(ValueError, match="references"):
        exact_match(["a"], ["a", "b"])

"""Generation on a model in memory: greedy equals a cache-free reference, batching, sampling, stop strings.

Streaming and the detokenizer are `SequenceState`'s, shared with the engine (tests/modulora/serve).
"""

import copy
import dataclasses

import pytest
import torch
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from modulora.generate import generate
from modulora.lora import LoraConfig, add_lora_
from modulora.serve.sequence import encode_prompt
from modulora.serve.types import SamplingParams

PROMPTS = [
    "Question: Who wrote Hamlet?\nType:",
    "hello",
    "The quick brown fox jumps over the lazy dog. What is",
]


def greedy(max_tokens: int, **params) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **params)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    model = quantize_rtn_(tiny_llama(), bits=4)
    add_lora_(model, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # a trained-looking adapter, so the LoRA path changes the output
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@torch.no_grad()
def greedy_reference(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """Recompute the whole sequence each step: no cache, no padding."""
    ids = encode_prompt(tokenizer, prompt)
    out = []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return out


def test_greedy_with_cache_and_left_padding_matches_reference(model, tokenizer) -> None:
    completions = generate(model, tokenizer, PROMPTS, greedy(12))
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        assert completion.token_ids == greedy_reference(model, tokenizer, prompt, 12)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.prompt_tokens == len(encode_prompt(tokenizer, prompt))


def test_batched_equals_one_at_a_time(model, tokenizer) -> None:
    batched = generate(model, tokenizer, PROMPTS, greedy(10))
    single = [generate(model, tokenizer, [p], greedy(10))[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def test_sampling_is_reproducible_with_a_seed(model, tokenizer) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = generate(model, tokenizer, PROMPTS, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in generate(model, tokenizer, PROMPTS, params)]
    others = [generate(model, tokenizer, PROMPTS, dataclasses.replace(params, seed=s)) for s in range(3)]
    assert any([c.token_ids for c in o] != [c.token_ids for c in first] for o in others)


def test_n_choices_per_prompt_are_seeded_one_by_one(model, tokenizer) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3)
    choices = generate(model, tokenizer, PROMPTS[:2], params)
    assert len(choices) == 6 and len({tuple(c.token_ids) for c in choices[:3]}) > 1
    # Choice i draws from seed + i: the second choice of seed 7 is the first choice of seed 8.
    (second,) = generate(model, tokenizer, PROMPTS[:1], dataclasses.replace(params, seed=8, n=1))
    assert choices[1].token_ids == second.token_ids


def test_top_k_one_is_greedy(model, tokenizer) -> None:
    argmax = generate(model, tokenizer, PROMPTS, greedy(8))
    sampled = generate(
        model, tokenizer, PROMPTS, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=0)
    )
    assert [c.token_ids for c in sampled] == [c.token_ids for c in argmax]


def test_length_finish_reason_and_token_budget(model, tokenizer) -> None:
    (completion,) = generate(model, tokenizer, [PROMPTS[0]], greedy(3))
    assert len(completion.token_ids) <= 3
    assert completion.finish_reason == ("length" if len(completion.token_ids) == 3 else "stop")


def test_stop_string_cuts_the_text(model, tokenizer) -> None:
    (full,) = generate(model, tokenizer, [PROMPTS[2]], greedy(12))
    assert len(full.text) > 3, "the tiny model must produce some text for this test"
    stop = full.text[2:4]
    (stopped,) = generate(model, tokenizer, [PROMPTS[2]], greedy(12, stop=[stop]))
    assert stopped.text == full.text[: full.text.find(stop)] and stopped.finish_reason == "stop"


def test_eos_ends_the_completion_without_joining_it(model, tokenizer) -> None:
    (full,) = generate(model, tokenizer, [PROMPTS[1]], greedy(6))
    tokenizer_with_eos = copy.copy(tokenizer)
    # Make the third greedy token the end of sequence: generation stops before it.
    tokenizer_with_eos.eos_token = tokenizer.convert_ids_to_tokens(full.token_ids[2])
    (ended,) = generate(model, tokenizer_with_eos, [PROMPTS[1]], greedy(6))
    assert ended.token_ids == full.token_ids[:2] and ended.finish_reason == "stop"
    assert ended.text == tokenizer.decode(full.token_ids[:2], skip_special_tokens=True)


def test_chat_prompt_uses_the_chat_template(model, tokenizer) -> None:
    messages = [{"role": "user", "content": "hello"}]
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tokenizer, messages) == encode_prompt(tokenizer, rendered)
    chat = generate(model, tokenizer, [messages], greedy(5))
    assert [c.token_ids for c in chat] == [
        c.token_ids for c in generate(model, tokenizer, [rendered], greedy(5))
    ]


def test_training_mode_is_restored(model, tokenizer) -> None:
    model.train()
    generate(model, tokenizer, PROMPTS[:1], greedy(2))
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0), ("n", 0), ("stop", ["a"] * 5)],
)
def test_sampling_params_reject_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})

"""Generation: greedy equals a cache-free reference, batching, sampling, stop strings, streaming."""

import pytest
import torch
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from modulora.generate import SamplingConfig, encode_prompt, generate, stream_generate
from modulora.lora import LoraConfig, add_lora_

PROMPTS = [
    "Question: Who wrote Hamlet?\nType:",
    "hello",
    "The quick brown fox jumps over the lazy dog. What is",
]


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
    completions = generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        assert completion.token_ids == greedy_reference(model, tokenizer, prompt, 12)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.prompt_tokens == len(encode_prompt(tokenizer, prompt))


def test_batched_equals_one_at_a_time(model, tokenizer) -> None:
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10)
    single = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def test_sampling_is_reproducible_with_a_seed(model, tokenizer) -> None:
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = generate(model, tokenizer, PROMPTS, config)
    assert [c.token_ids for c in first] == [c.token_ids for c in generate(model, tokenizer, PROMPTS, config)]
    others = [generate(model, tokenizer, PROMPTS, config, seed=s) for s in range(3)]
    assert any([c.token_ids for c in o] != [c.token_ids for c in first] for o in others)


def test_top_k_one_is_greedy(model, tokenizer) -> None:
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1, seed=0)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]


def test_length_finish_reason_and_token_budget(model, tokenizer) -> None:
    (completion,) = generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=3)
    assert len(completion.token_ids) <= 3
    assert completion.finish_reason == ("length" if len(completion.token_ids) == 3 else "stop")


def test_stop_string_cuts_the_text(model, tokenizer) -> None:
    (full,) = generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=12)
    assert len(full.text) > 3, "the tiny model must produce some text for this test"
    stop = full.text[2:4]
    (stopped,) = generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=12, stop=[stop])
    assert stopped.text == full.text[: full.text.find(stop)] and stopped.finish_reason == "stop"


@pytest.mark.parametrize("stop", [[], "use-text"])
def test_stream_concatenates_to_the_generated_text(model, tokenizer, stop) -> None:
    (full,) = generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=12)
    stop = [full.text[3:5]] if stop else []
    (expected,) = generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=12, stop=stop)
    deltas = list(stream_generate(model, tokenizer, PROMPTS[2], max_new_tokens=12, stop=stop))
    assert "".join(deltas) == expected.text and len(deltas) > 1


def test_chat_prompt_uses_the_chat_template(model, tokenizer) -> None:
    messages = [{"role": "user", "content": "hello"}]
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tokenizer, messages) == encode_prompt(tokenizer, rendered)
    chat = generate(model, tokenizer, [messages], max_new_tokens=5)
    assert [c.token_ids for c in chat] == [
        c.token_ids for c in generate(model, tokenizer, [rendered], max_new_tokens=5)
    ]


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_new_tokens", 0)]
)
def test_sampling_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})

"""The KV-cache decoder reproduces the Hugging Face forward of the model it wraps."""

import copy
from typing import Any

import torch

from api.inference.decoder import Decoder


def greedy(decoder: Decoder, prompt: list[int], row: int, steps: int) -> list[int]:
    logits = decoder.forward(torch.tensor([prompt]), [row], [0], [0])
    tokens = [int(logits.argmax())]
    for position in range(len(prompt), len(prompt) + steps - 1):
        logits = decoder.forward(torch.tensor([[tokens[-1]]]), [row], [position], [0])
        tokens.append(int(logits.argmax()))
    return tokens


def test_greedy_decode_matches_hf_generate(tiny_base: torch.nn.Module) -> None:
    prompt = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_base.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, 11:
        ].tolist()
    decoder = Decoder(copy.deepcopy(tiny_base), rows=3, max_seq_len=64)
    assert greedy(decoder, prompt[0].tolist(), row=2, steps=12) == expected


def test_prefill_logits_match_hf_forward(tiny_base: torch.nn.Module) -> None:
    prompt = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_base(prompt).logits[:, -1]
    decoder = Decoder(copy.deepcopy(tiny_base), rows=1, max_seq_len=16)
    torch.testing.assert_close(decoder.forward(prompt, [0], [0], [0]), expected, rtol=1e-4, atol=1e-4)


def test_batch_rows_at_different_positions_match_each_row_alone(
    tiny_base: torch.nn.Module, tokenizer: Any
) -> None:
    prompts = [list(range(100, 105)), list(range(200, 212)), list(range(300, 308))]
    alone = [greedy(Decoder(copy.deepcopy(tiny_base), rows=1, max_seq_len=32), p, 0, 6) for p in prompts]

    decoder = Decoder(copy.deepcopy(tiny_base), rows=4, max_seq_len=32)
    rows = [3, 0, 2]  # not contiguous, not sorted: the gather path of the cache
    tokens = [
        [int(decoder.forward(torch.tensor([p]), [r], [0], [0]).argmax())]
        for p, r in zip(prompts, rows, strict=True)
    ]
    for step in range(5):
        last = torch.tensor([[t[-1]] for t in tokens])
        logits = decoder.forward(last, rows, [len(p) + step for p in prompts], [0, 0, 0])
        for t, row_logits in zip(tokens, logits, strict=True):
            t.append(int(row_logits.argmax()))
    assert tokens == alone

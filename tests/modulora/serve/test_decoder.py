"""The KV-cache decoder reproduces the Hugging Face forward of the model it wraps."""

import copy
from typing import Any

import pytest
import torch

from modulora.quant.quip import E8PProjections
from modulora.serve.decoder import Decoder, _fuse
from tests.modulora.serve.factories import dense_copy, tiny_e8p_llama, tiny_quantized_llama


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


def test_prefill_in_chunks_and_in_scattered_rows_gives_the_logits_of_one_prefill(
    tiny_base: torch.nn.Module,
) -> None:
    """A prompt's first prefill attends causally over itself; a later chunk reads the cache through
    the mask. Both, and a batch of prompts prefilled into rows out of order, agree with HF."""
    prompts = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_base(prompts).logits[:, -1]
    decoder = Decoder(copy.deepcopy(tiny_base), rows=3, max_seq_len=16)
    decoder.forward(prompts[:1, :5], [1], [0], [0])
    chunked = decoder.forward(prompts[:1, 5:], [1], [5], [0])
    torch.testing.assert_close(chunked, expected[:1], rtol=1e-4, atol=1e-4)
    scattered = decoder.forward(prompts, [2, 0], [0, 0], [0, 0])
    torch.testing.assert_close(scattered, expected, rtol=1e-4, atol=1e-4)


def test_fused_qkv_and_gate_up_products_give_the_model_logits() -> None:
    # GPUs run q/k/v and gate/up as one low-bit product each; forced here on CPU, with adapters in
    # the batch so that the LoRA branch is applied to each split output.
    model = tiny_quantized_llama(vocab_size=1000)
    prompt = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(prompt).logits[:, -1]
    decoder = Decoder(copy.deepcopy(model), rows=1, max_seq_len=16)
    decoder.fused_qkv = [_fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in decoder.layers]
    decoder.fused_gate_up = [_fuse(layer.mlp, ("gate_proj", "up_proj")) for layer in decoder.layers]
    assert all(f is not None for f in decoder.fused_qkv + decoder.fused_gate_up)
    torch.testing.assert_close(decoder.forward(prompt, [0], [0], [0]), expected, rtol=1e-4, atol=1e-4)

    for layer in decoder.lora_layers.values():
        layer.resize_(2, 2)
        layer.load_slot_(
            1, torch.randn(2, layer.in_features) * 0.1, torch.randn(layer.out_features, 2) * 0.1, 1.0
        )
    unfused = Decoder(copy.deepcopy(model), rows=1, max_seq_len=16)
    for name, layer in unfused.lora_layers.items():
        layer.resize_(2, 2)
        layer.lora_A.copy_(decoder.lora_layers[name].lora_A)
        layer.lora_B.copy_(decoder.lora_layers[name].lora_B)
    torch.testing.assert_close(
        decoder.forward(prompt, [0], [0], [1]), unfused.forward(prompt, [0], [0], [1]), rtol=1e-4, atol=1e-4
    )


def prefill_then_decode(decoder: Decoder, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [T - prefill + 1, vocab]: the prefill's last position, then one decode step per token."""
    device = decoder.device
    got = [decoder.forward(tokens[:, :prefill].to(device), [0], [0], [0])[0]]
    for p in range(prefill, tokens.shape[1]):
        got.append(decoder.forward(tokens[:, p : p + 1].to(device), [0], [p], [0])[0])
    return torch.stack(got)


@pytest.mark.parametrize("kernels", ["reference", "interpret"])
def test_quip_decoder_with_fused_projections_matches_the_dense_model(
    kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QuIP# q/k/v and gate/up as one rotation + E8P product each (as on a GPU), on CPU: with the
    # PyTorch references, and with the Triton kernels under the interpreter (the Hadamard transforms
    # run there; the fused E8P product takes fp16/bf16 rows only). Against the materialized weights.
    if kernels == "interpret":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_e8p_llama(vocab_size=1000)
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = dense_copy(model)(tokens).logits[0, 8:]
    decoder = Decoder(copy.deepcopy(model), rows=1, max_seq_len=16)
    decoder.fused_qkv = [_fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in decoder.layers]
    decoder.fused_gate_up = [_fuse(layer.mlp, ("gate_proj", "up_proj")) for layer in decoder.layers]
    assert all(isinstance(f, E8PProjections) for f in decoder.fused_qkv + decoder.fused_gate_up)
    decoder.decode_kernels = True
    torch.testing.assert_close(prefill_then_decode(decoder, tokens, 9), expected, rtol=1e-4, atol=1e-4)


def test_decode_kernels_give_the_logits_of_the_masked_attention_path(tiny_base: torch.nn.Module) -> None:
    # GPUs decode with the rotary + cache-write kernel and flash-decoding over each row's own
    # length; forced here on CPU (their references) against the masked SDPA over the whole cache.
    prompts = [list(range(100, 105)), list(range(200, 212))]
    decoders = [Decoder(copy.deepcopy(tiny_base), rows=2, max_seq_len=32) for _ in range(2)]
    decoders[0].decode_kernels, decoders[1].decode_kernels = True, False
    last = []
    for decoder in decoders:
        last.append(
            [int(decoder.forward(torch.tensor([p]), [r], [0], [0]).argmax()) for r, p in enumerate(prompts)]
        )
    assert last[0] == last[1]
    tokens = torch.tensor([[t] for t in last[0]])
    for step in range(4):
        start = [len(p) + step for p in prompts]
        kernels, masked = (d.forward(tokens, [0, 1], start, [0, 0]) for d in decoders)
        torch.testing.assert_close(kernels, masked, rtol=1e-4, atol=1e-4)
        tokens = kernels.argmax(-1, keepdim=True)


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


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode_with_mixed_adapters() -> None:
    model = tiny_quantized_llama(vocab_size=1000).to("cuda")
    decoders = {
        graphs: Decoder(copy.deepcopy(model), rows=4, max_seq_len=48, use_graphs=graphs)
        for graphs in (False, True)
    }
    generator = torch.Generator().manual_seed(0)
    for decoder in decoders.values():
        for layer in decoder.lora_layers.values():
            layer.resize_(3, 4)
        decoder.invalidate_graphs()
    for name, layer in decoders[False].lora_layers.items():
        for slot in (1, 2):
            a, b = (
                torch.randn(4, layer.in_features, generator=generator),
                torch.randn(layer.out_features, 4, generator=generator),
            )
            for decoder in decoders.values():
                decoder.lora_layers[name].load_slot_(slot, a.cuda() * 0.1, b.cuda() * 0.1, scaling=2.0)

    prompts, slots = [list(range(10, 17)), list(range(40, 45)), list(range(70, 79))], [1, 0, 2]
    logits = {}
    for graphs, decoder in decoders.items():
        tokens = [
            int(decoder.forward(torch.tensor([p], device="cuda"), [r], [0], [slots[r]]).argmax())
            for r, p in enumerate(prompts)
        ]
        steps = []
        for step in range(6):
            last = torch.tensor([[t] for t in tokens], device="cuda")
            out = decoder.forward(last, [0, 1, 2], [len(p) + step for p in prompts], slots)
            steps.append(out)
            tokens = out.argmax(-1).tolist()
        logits[graphs] = torch.stack(steps)
    assert decoders[True]._graphs, "the decode steps should have replayed a captured graph"
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_quip_decoder_matches_the_dense_model(graphs: bool) -> None:
    """QuIP# on a GPU: the Hadamard and E8P kernels (fused q/k/v and gate/up), eagerly and replayed
    from the decode step's CUDA graphs; prefill and decode logits match the materialized model's."""
    model = tiny_e8p_llama(vocab_size=1000, dtype=torch.bfloat16).to("cuda")
    dense = dense_copy(model).to(torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, 14), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        expected = dense(tokens).logits[0, 9:].float()
    decoder = Decoder(copy.deepcopy(model), rows=1, max_seq_len=32, use_graphs=graphs)
    assert all(isinstance(f, E8PProjections) for f in decoder.fused_qkv + decoder.fused_gate_up)
    torch.testing.assert_close(prefill_then_decode(decoder, tokens, 10), expected, rtol=0.05, atol=0.05)
    assert len(decoder._graphs) == (1 if graphs else 0)  # the batch-1 decode step, captured once


@pytest.mark.gpu
def test_cuda_decoder_with_fused_kernels_matches_hf_forward() -> None:
    """On a GPU the decoder runs its own kernels (residual add + RMSNorm, rotary, SwiGLU, the low-bit
    matmuls); the logits of a prefill and of the decode steps after it match the model's forward."""
    model = tiny_quantized_llama(vocab_size=1000).to("cuda", torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, 14), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        expected = model(tokens).logits[0, 9:].float()  # positions 9..13: prefill's last, then decode
    decoder = Decoder(copy.deepcopy(model), rows=1, max_seq_len=32, use_graphs=False)
    got = [decoder.forward(tokens[:, :10], [0], [0], [0])[0]]
    got += [decoder.forward(tokens[:, p : p + 1], [0], [p], [0])[0] for p in range(10, 14)]
    torch.testing.assert_close(torch.stack(got), expected, rtol=0.05, atol=0.05)

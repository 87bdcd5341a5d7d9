"""The fused cross-entropy kernel against `F.cross_entropy` on fp32 logits: value, gradient, training."""

import pytest
import torch

from gpu_kernels.cross_entropy import FusedCrossEntropySum, cross_entropy_sum, cross_entropy_sum_ref

IGNORE = -100


def random_targets(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    targets = torch.randint(0, vocab, (rows,), device=device)
    targets[::3] = IGNORE  # every third row is a prompt or padding position
    targets[1] = vocab - 1  # the last column, in the last (partial) block
    return targets


# 1000: one partial block; 5000: a full block of 4096 and a partial one; scale 30: logits far from 0
@pytest.mark.parametrize(("vocab", "scale"), [(1000, 1.0), (5000, 1.0), (1000, 30.0)])
def test_loss_and_gradient_match_the_reference(device: torch.device, vocab: int, scale: float) -> None:
    logits = (torch.randn(7, vocab, device=device) * scale).requires_grad_()
    targets = random_targets(7, vocab, device)
    want = cross_entropy_sum_ref(logits, targets, IGNORE)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = cross_entropy_sum(logits.clone(), targets, IGNORE)  # the kernel overwrites its input
    (got_grad,) = torch.autograd.grad(got * 2, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad * 2, rtol=1e-5, atol=1e-6)
    assert torch.all(got_grad[::3] == 0), "ignored rows get no gradient"


def test_bf16_logits_match_the_fp32_reference(device: torch.device) -> None:
    logits = torch.randn(6, 32000, device=device).bfloat16()
    targets = random_targets(6, 32000, device)
    got = cross_entropy_sum(logits.clone(), targets, IGNORE)
    torch.testing.assert_close(got, cross_entropy_sum_ref(logits, targets, IGNORE), rtol=1e-5, atol=1e-3)


def test_without_gradient_the_logits_are_left_alone(device: torch.device) -> None:
    logits = torch.randn(4, 1000, device=device)
    before = logits.clone()
    cross_entropy_sum(logits, random_targets(4, 1000, device), IGNORE)
    assert torch.equal(logits, before)


def test_twenty_training_steps_follow_the_reference(device: torch.device) -> None:
    # An LM head trained 20 AdamW steps on fixed hidden states: the losses of the fused kernel and of
    # the reference must stay together, step by step.
    hidden = torch.randn(12, 32, generator=torch.Generator().manual_seed(0)).to(device)
    targets = random_targets(12, 1000, device)
    curves = []
    for loss_fn in (cross_entropy_sum_ref, cross_entropy_sum):
        head = torch.nn.Linear(32, 1000, bias=False, device=device)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1000, 32, generator=torch.Generator().manual_seed(1)) * 0.1)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            loss = loss_fn(head(hidden), targets, IGNORE)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[1][-1] < curves[1][0] / 2, "the head learns"
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-4)


def test_training_losses_go_through_the_kernel(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # modulora.loss on a tiny LLaMA: the graphed step's chunked loss (3 positions a chunk, under
    # activation checkpointing) with the kernel equals the reference's, value and gradients.
    from utils.tiny_lm import tiny_llama

    from modulora import loss as training_loss

    launches = []
    fused = FusedCrossEntropySum.apply
    monkeypatch.setattr(FusedCrossEntropySum, "apply", lambda *args: launches.append(1) or fused(*args))
    monkeypatch.setattr(training_loss, "LOSS_CHUNK_TOKENS", 3)
    input_ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": input_ids.to(device), "labels": labels.to(device)}
    results = []
    for disable in ("1", "0"):
        monkeypatch.setenv("MODULORA_DISABLE_TRITON", disable)
        model = tiny_llama().to(device).train()
        total = training_loss.token_loss_sum(model, batch)
        total.backward()
        results.append((total.detach(), model.lm_head.weight.grad, model.model.embed_tokens.weight.grad))
    assert len(launches) == 2 * 6, "each of the 6 chunks, in the forward pass and recomputed"
    for got, want in zip(results[1], results[0], strict=True):  # fp32, summed in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

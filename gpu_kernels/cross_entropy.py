"""Summed cross-entropy over a large vocabulary without fp32 logits: `sum_i lse(x_i) - x_i[t_i]`.

The reference (`cross_entropy_sum_ref`) is what training ran before: `F.cross_entropy` on the
logits cast to fp32, which for one chunk of 2048 positions over LLaMA's 32k vocabulary is a 262 MB
fp32 copy plus its 262 MB gradient, and four times that over a 128k vocabulary. The kernel reads
each row of the (bf16) logits in blocks of the vocabulary, keeps a running max and sum of
exponentials in fp32 registers (the logsumexp, chunked), and in a second pass over the row writes
the gradient `softmax(x) - onehot(t)` in place of the logits it has read: the backward pass only
scales it by the incoming gradient. So the only vocabulary-sized tensor is the logits the LM head
already produced. Rows whose target is `ignore_index` contribute 0 and get a zero gradient.

The logits passed in are overwritten: the LM head's backward needs its input and weight, never its
output, and `modulora.loss` recomputes a chunk's logits under activation checkpointing anyway.
"""

import torch
import torch.nn.functional as F

from gpu_kernels._dispatch import launchable, triton_available, use_triton


def cross_entropy_sum_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of `logits` [n, vocab] against `targets` [n], in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`cross_entropy_sum_ref`'s value and gradient; the fused kernel on CUDA (it overwrites
    `logits` with their gradient, see the module docstring), the reference elsewhere."""
    if not use_triton(logits, targets):
        return cross_entropy_sum_ref(logits, targets, ignore_index)
    return FusedCrossEntropySum.apply(logits, targets, ignore_index)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _cross_entropy_kernel(
        logits_ptr, targets_ptr, loss_ptr, row_stride, vocab, ignore_index,
        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # tl.full and tl.reduce with our own combine functions rather than tl.zeros / tl.max / tl.sum,
        # standard-library JIT functions that Triton's interpreter cannot call from a kernel imported
        # before it was enabled.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        offs = tl.arange(0, BLOCK)
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):  # per lane: max and sum of exp(x - max) over its columns
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            # a lane past the vocabulary's end stays at -inf: shift by 0 there, so exp(-inf) = 0
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)
            running_max = new_max
        row_max = tl.reduce(running_max, 0, _maximum)
        lse = row_max + tl.log(tl.reduce(running_sum * tl.exp(running_max - row_max), 0, _add))
        ignored = target == ignore_index
        safe_target = tl.where(ignored, 0, target)
        target_logit = tl.load(row_ptr + safe_target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target_logit))
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                x = tl.load(row_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                grad = tl.where(ignored, 0.0, grad)
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < vocab)

    def _launch(
        logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool
    ) -> torch.Tensor:
        rows, vocab = logits.shape
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            block = min(4096, triton.next_power_of_2(vocab))
            launchable(_cross_entropy_kernel)[(rows,)](
                logits, targets, losses, logits.stride(0), vocab, ignore_index,
                WRITE_GRAD=write_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4,
            )  # fmt: skip
        return losses


class FusedCrossEntropySum(torch.autograd.Function):
    """Autograd for the kernel: the forward pass leaves the gradient in the logits' storage."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:  # type: ignore[override]
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        write_grad = logits.requires_grad
        loss = _launch(logits.detach(), targets, ignore_index, write_grad).sum()
        if write_grad:
            ctx.save_for_backward(logits.detach())
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # Scaled in place: no second vocabulary-sized tensor. A graph is backpropagated once here
        # (`modulora.loss` recomputes each chunk under checkpointing), so it is scaled once.
        return grad.mul_(grad_loss.to(grad.dtype)), None, None

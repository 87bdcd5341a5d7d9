"""RMSNorm with the residual add before it, in one pass: `s = x + residual; y = norm(s)·weight`.

A decoder layer adds each block's output to the residual stream and normalizes the sum for the
next block. As PyTorch ops that is six small kernels (add, square, mean, rsqrt, two multiplies);
at batch-1 decode every one of them is a launch of a few microseconds over a few kilobytes.
Rounding follows Hugging Face's LlamaRMSNorm: the sum rounds to x's dtype, the statistics are fp32,
the normalized value rounds to x's dtype before the weight multiplies it.
"""

import torch

from gpu_kernels._dispatch import dependent_launch, launchable, triton_available, use_triton


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual)·weight, x + residual); residual None normalizes x alone."""
    summed = x if residual is None else residual + x
    s = summed.to(torch.float32)
    normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), summed


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., hidden] -> (normalized sum, sum); Triton on CUDA, the reference elsewhere."""
    if not use_triton(x, weight) or x.shape[-1] > MAX_HIDDEN:
        return add_rmsnorm_ref(x, residual, weight, eps)
    return add_rmsnorm_triton(x, residual, weight, eps)


MAX_HIDDEN = 16384  # one program holds a whole row in registers

if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, residual_ptr, weight_ptr, y_ptr, sum_ptr, n, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * n + offs, mask=mask, other=0.0)
            x = (residual.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n + offs, x, mask=mask)
        s = x.to(tl.float32)
        # tl.reduce with our own combine function rather than tl.sum, whose standard-library JIT
        # function Triton's interpreter cannot call from a kernel imported before it was enabled
        rstd = 1.0 / tl.sqrt(tl.reduce(s * s, 0, _add) / n + eps)
        normed = (s * rstd).to(x.dtype).to(tl.float32)
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + offs, (weight * normed).to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x = x.contiguous()
    summed = x if residual is None else torch.empty_like(x)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    launchable(_add_rmsnorm_kernel)[(x.numel() // n,)](
        x, x if residual is None else residual.contiguous(), weight, y, summed, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        **dependent_launch(x.device),
    )  # fmt: skip
    return y, summed

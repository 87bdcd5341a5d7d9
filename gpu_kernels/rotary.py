"""Rotary position embedding applied to query or key heads in place, one launch per tensor.

`x·cos + rotate_half(x)·sin` is five PyTorch kernels per tensor (two slices, a negation, a
concatenation, the multiply-add); at batch-1 decode each is a launch over a few kilobytes.
Rounding follows Hugging Face's `apply_rotary_pos_emb`: both products round to x's dtype, then
their sum does.
"""

import torch

from gpu_kernels._dispatch import launchable, triton_available, use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, tokens, heads, head_dim], cos/sin [batch, tokens, head_dim] -> rotated x (new)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + _rotate_half(x) * sin


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, tokens, heads, head_dim] in place and return it.

    x may be a column slice of a wider projection output (q of a fused q/k/v product): its heads
    must be contiguous, its tokens any stride.
    """
    batch, tokens, heads, head_dim = x.shape
    rows = x.view(batch * tokens, heads, head_dim) if _rows_flatten(x) else None
    if not use_triton(x, cos) or rows is None:
        return x.copy_(apply_rotary_ref(x, cos, sin))
    cos, sin = cos.contiguous(), sin.contiguous()
    launchable(_rotary_kernel)[(batch * tokens,)](
        rows, cos.to(x.dtype), sin.to(x.dtype), heads, rows.stride(0),
        HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(heads),
        enable_fp_fusion=False,  # in fp32 a fused multiply-add would skip the products' rounding
    )  # fmt: skip
    return x


def _rows_flatten(x: torch.Tensor) -> bool:
    """Whether x [batch, tokens, heads, head_dim] views as [batch·tokens, heads, head_dim] with
    contiguous heads."""
    head_dim = x.shape[-1]
    return x.stride(3) == 1 and x.stride(2) == head_dim and x.stride(0) == x.shape[1] * x.stride(1)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, heads, stride_t, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Program t: every head of token t; x1/x2 are the two halves of each head."""
        t = tl.program_id(0)
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_d = tl.arange(0, HALF)[None, :]
        mask = offs_h < heads
        ptrs = x_ptr + t * stride_t + offs_h * 2 * HALF + offs_d
        x1 = tl.load(ptrs, mask=mask, other=0.0)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
        c1 = tl.load(cos_ptr + t * 2 * HALF + offs_d)
        c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + offs_d)
        s1 = tl.load(sin_ptr + t * 2 * HALF + offs_d)
        s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + offs_d)
        dtype = x1.dtype
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        tl.store(ptrs, out1.to(dtype), mask=mask)
        tl.store(ptrs + HALF, out2.to(dtype), mask=mask)

"""SwiGLU's gate: silu(gate)·up in one kernel (LLaMA's MLP between its up and down projections).

Two PyTorch kernels otherwise, each a launch at batch-1 decode. Rounding follows the model's
`act_fn(gate) * up`: silu rounds to the input dtype, then the product does.
"""

import torch
import torch.nn.functional as F

from gpu_kernels._dispatch import launchable, triton_available, use_triton


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up, same shapes; Triton on CUDA, the reference elsewhere."""
    if not use_triton(gate, up) or gate.shape != up.shape:
        return silu_mul_ref(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    block = 1024
    launchable(_silu_mul_kernel)[(triton.cdiv(gate.numel(), block),)](
        gate, up, out, gate.numel(), BLOCK=block
    )
    return out


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        up = tl.load(up_ptr + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(
            out_ptr + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask
        )

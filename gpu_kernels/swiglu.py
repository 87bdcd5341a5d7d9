"""SwiGLU's gate: silu(gate)·up in one kernel (LLaMA's MLP between its up and down projections).

Two PyTorch kernels otherwise, each a launch at batch-1 decode. Rounding follows the model's
`act_fn(gate) * up`: silu rounds to the input dtype, then the product does.
"""

import torch
import torch.nn.functional as F

from gpu_kernels._dispatch import dependent_launch, launchable, triton_available, use_triton


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up [..., n] -> a new contiguous tensor; Triton on CUDA, the reference elsewhere.

    gate and up may be column slices of one wider product (a fused gate/up projection): rows of
    any stride, columns contiguous.
    """
    n = gate.shape[-1]
    if not use_triton(gate, up) or gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return silu_mul_ref(gate, up)
    gate2, up2 = gate.reshape(-1, n), up.reshape(-1, n)  # views when the leading dims flatten
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    launchable(_silu_mul_kernel)[(gate2.shape[0], triton.cdiv(n, block))](
        gate2, up2, out, n, gate2.stride(0), up2.stride(0), BLOCK=block, **dependent_launch(gate.device)
    )
    return out


if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs

    @triton.jit
    def _silu_mul_kernel(
        gate_ptr, up_ptr, out_ptr, n, stride_gate, stride_up, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        wait_for_inputs(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0)
        up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(
            out_ptr + row * n + offs,
            (silu.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
            mask=mask,
        )

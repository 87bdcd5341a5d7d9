"""Low-bit weight kernels: Triton on CUDA tensors, PyTorch references on everything else.

Each op lives in its own file with its Triton kernel, its launcher and a `<op>_ref` in plain
PyTorch. The public functions below pick the implementation from the tensors' device, so the
library calls one name and never branches on hardware itself.
"""

from gpu_kernels.e8p import e8p_decode, e8p_decode_ref, e8p_grid, e8p_signed_grid, e8p_values
from gpu_kernels.e8p_matmul import e8p_matmul, e8p_matmul_ref
from gpu_kernels.gptq_matmul import gptq_matmul, gptq_matmul_ref
from gpu_kernels.hadamard import hadamard, hadamard_factors, hadamard_matrix, hadamard_ref
from gpu_kernels.materialize_gguf import materialize_gguf, materialize_gguf_ref
from gpu_kernels.materialize_gptq import materialize_gptq, materialize_gptq_ref, unpack_bits_ref
from gpu_kernels.materialize_nf4 import materialize_nf4, materialize_nf4_ref

__all__ = [
    "e8p_decode",
    "e8p_decode_ref",
    "e8p_grid",
    "e8p_matmul",
    "e8p_matmul_ref",
    "e8p_signed_grid",
    "e8p_values",
    "gptq_matmul",
    "gptq_matmul_ref",
    "hadamard",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_ref",
    "materialize_gguf",
    "materialize_gguf_ref",
    "materialize_gptq",
    "materialize_gptq_ref",
    "materialize_nf4",
    "materialize_nf4_ref",
    "unpack_bits_ref",
]

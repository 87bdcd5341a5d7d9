"""Choosing between a Triton kernel and its PyTorch reference."""

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors; under TRITON_INTERPRET=1 it also runs on CPU tensors (tests)."""
    if os.environ.get("MODULORA_DISABLE_TRITON") == "1" or not triton_available():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return all(t.is_cuda for t in tensors)

"""Choosing between a Triton kernel and its PyTorch reference, and launching kernels on CPU for tests."""

import functools
import os
from typing import Any

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors; under TRITON_INTERPRET=1 it also runs on CPU tensors (tests)."""
    if os.environ.get("MODULORA_DISABLE_TRITON") == "1" or not triton_available():
        return False
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


@functools.cache
def _interpreted(kernel: Any) -> Any:
    """`kernel` as Triton's interpreter runs it, with every @triton.jit helper it calls converted too.

    `@triton.jit` reads TRITON_INTERPRET when the module is imported, so a kernel imported before a
    test sets the variable would be compiled for a GPU. This rebuilds it (and its helpers, found in
    the module globals) as interpreted functions, so the same kernel object runs on CPU tensors.
    """
    import types

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fn = kernel.fn
    globals_ = dict(fn.__globals__)
    for name in fn.__code__.co_names:  # the helpers this function calls (kernels never recurse)
        if isinstance(globals_.get(name), JITFunction):
            globals_[name] = _interpreted(globals_[name])
    rebuilt = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    rebuilt.__annotations__ = fn.__annotations__
    return InterpretedFunction(rebuilt)


def launchable(kernel: Any) -> Any:
    """The kernel to index with a grid: itself on a GPU, its interpreted twin under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    if interpreting() and isinstance(kernel, JITFunction):
        return _interpreted(kernel)
    return kernel

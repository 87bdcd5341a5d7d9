"""Choosing between a Triton kernel and its PyTorch reference, and launching kernels on CPU for tests."""

import functools
import os
from collections.abc import Callable
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


_fastest: dict[tuple, dict[str, int]] = {}


def fastest_config(
    key: tuple,
    candidates: list[dict[str, int]],
    launch: Callable[[dict[str, int]], Any],
    device: torch.device,
) -> dict[str, int]:
    """The candidate with the shortest `launch` time for `key`, timed once per process on CUDA.

    Triton's autotuner does the same inside the kernel object; this works on the launcher instead,
    so the same code runs `launchable`'s interpreted kernels in tests, where it returns the first
    candidate. Each candidate is timed as CUDA-graph replays, so that calls shorter than their launch
    (small weights materialize in a few microseconds) compare by device time. The choice must happen
    outside CUDA-graph capture, which is why the inference engine warms up before capturing.
    """
    if device.type != "cuda" or interpreting():
        return candidates[0]
    if key not in _fastest:
        from triton.testing import do_bench_cudagraph

        for c in candidates:  # compile outside the timed graphs
            launch(c)
        times = [do_bench_cudagraph(lambda c=c: launch(c), rep=10) for c in candidates]
        _fastest[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
    return _fastest[key]

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
    calls_itself = []
    for name in fn.__code__.co_names:  # the helpers this function calls
        helper = globals_.get(name)
        if helper is kernel:
            calls_itself.append(name)
        elif isinstance(helper, JITFunction):
            globals_[name] = _interpreted(helper)
    rebuilt = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    rebuilt.__annotations__ = fn.__annotations__
    interpreted = InterpretedFunction(rebuilt)
    for name in calls_itself:  # a recursive helper (unrolled by constexpr arguments) calls its twin
        globals_[name] = interpreted
    return interpreted


def launchable(kernel: Any) -> Any:
    """The kernel to index with a grid: itself on a GPU, its interpreted twin under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    if interpreting() and isinstance(kernel, JITFunction):
        return _interpreted(kernel)
    return kernel


@functools.cache
def _dependent_launch_supported(device: torch.device) -> bool:
    if interpreting() or not triton_available() or device.type != "cuda":
        return False
    import triton.language.extra.cuda as cuda_language
    from triton.backends.nvidia.compiler import CUDAOptions

    exposed = hasattr(cuda_language, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
    return exposed and torch.cuda.get_device_capability(device)[0] >= 9


def dependent_launch(device: torch.device) -> dict[str, bool]:
    """Launch options for a kernel that starts with `wait_for_inputs(PDL)` (gpu_kernels._pdl).

    Programmatic dependent launch (Hopper and later) lets a kernel's programs start while the
    kernel before it on the stream finishes, and wait on the device for its results instead of
    between launches: at batch-1 decode a step is a few hundred kernels of a few microseconds each,
    and every boundary between two of them, even inside a CUDA graph, leaves the GPU partly idle
    while one drains and the next ramps up. MODULORA_DISABLE_PDL=1 launches them one after another
    as usual.
    """
    on = os.environ.get("MODULORA_DISABLE_PDL") != "1" and _dependent_launch_supported(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


_constants: dict[tuple[str, torch.device], torch.Tensor] = {}


def device_constant(name: str, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The constant tensor `name` (a codebook, a small Hadamard matrix) resident on `device`, built by
    `build()` on the host and moved there once per process.

    Ops read their tables from here, never from a fresh host tensor: a host-to-device copy inside
    CUDA-graph capture fails ("Cannot copy between CPU and CUDA tensors during CUDA graph capture
    unless the CPU tensor is pinned", the QuIP# serving bug of issue 22), and one copy per call would
    cost a transfer every step anyway. The first call on a device must come before capture; graph
    warm-ups (`modulora.step_graph`, the inference engine's decoder) make it.
    """
    key = (name, torch.device(device))
    tensor = _constants.get(key)
    if tensor is None:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{name}: not yet on {key[1]}; run the op once before CUDA-graph capture (a warm-up)"
            )
        tensor = _constants[key] = build().to(key[1])
    return tensor


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
        # do_bench_cudagraph runs on a stream of its own that does not wait for this one: without the
        # sync, its calls would share the split-K workspace with the calls still queued here.
        torch.cuda.synchronize(device)
        times = [do_bench_cudagraph(lambda c=c: launch(c), rep=10) for c in candidates]
        _fastest[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
    return _fastest[key]


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []  # captured CUDA graphs may still point at these
WORKSPACE_MIN_VALUES = 1 << 20


def split_k_workspace(device: torch.device, values: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 accumulators (≥ `values`) and int32 arrival counters (≥ `counters`) for kernels whose
    programs meet at a counter (split-K matmuls, decode attention's chunks).

    Every kernel that uses them leaves them zero (its last program per output block takes the sum
    and zeroes its part), so one pair per device serves every call, in order on that device: calls
    from concurrent streams would mix their sums. The pair only grows, and outgrown pairs stay
    allocated because CUDA graphs captured earlier replay with their addresses. It is allocated
    outside any capture: run a call of each shape before capturing (graph warm-ups do).
    """
    pair = _workspaces.get(device)
    if pair is None or pair[0].numel() < values or pair[1].numel() < counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split_k_workspace: grow it before capture (run each shape once first)")
        if pair is not None:
            _outgrown.append(pair)
        values = max(values, WORKSPACE_MIN_VALUES, 0 if pair is None else pair[0].numel())
        counters = max(counters, WORKSPACE_MIN_VALUES // 64, 0 if pair is None else pair[1].numel())
        pair = (
            torch.zeros(values, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device),
        )
        _workspaces[device] = pair
    return pair

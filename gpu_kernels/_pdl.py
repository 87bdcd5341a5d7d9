"""The device side of programmatic dependent launch (`gpu_kernels._dispatch.dependent_launch`)."""

import triton
import triton.language as tl


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Let the next kernel on the stream start its programs now, then wait until the kernel before
    this one has finished and its writes are visible.

    A kernel launched with `dependent_launch` must call this before it reads what earlier kernels
    wrote or writes anything, in every program: the next kernel's wait covers this kernel only, so
    the chain of waits is what orders it after all the earlier ones. Only loads of data no kernel in
    the step writes (packed weights) may come first.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

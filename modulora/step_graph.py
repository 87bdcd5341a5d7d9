"""A training micro-batch's forward and backward replayed from a CUDA graph, one graph per batch shape.

A 7B ModuLoRA step at batch 1 x 512 launches about 11,000 kernels (every packed matmul three times:
forward, checkpoint recompute, input gradient; the LoRA branches, norms, rotary, attention), and
eagerly its Python and launch overhead is several times its GPU work. Captured once per shape and
replayed, the step costs its GPU time.

What replaying needs, and how it is met here:
- static shapes: callers pad batches to a few shapes (see `modulora.train`); each shape gets its
  graph, all sharing one memory pool, so the pool is as large as the largest shape's activations;
- no host synchronization in forward or backward: the loss stays on the device and callers count
  label tokens on the host;
- gradients land where the optimizer reads them: `.grad` tensors exist before capture and autograd
  adds into them in place, so eager optimizer steps, clipping and gradient accumulation work as
  usual; zero them with `zero_grad(set_to_none=False)`;
- warm-up runs before capture, on a side stream: kernels choose their tiles by timing, packed
  layers cache host-side facts, cuBLAS initializes. The warm-up's gradients are put back as they were.
Randomness (LoRA dropout) replays correctly: each replay advances the CUDA generator, and
activation checkpointing may save and restore its state during capture (PyTorch >= 2.10).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class CaptureError(RuntimeError):
    """The model could not be captured (a host synchronization, a dynamic shape, ...)."""


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    batch: dict[str, torch.Tensor]  # static inputs, copied into before each replay
    scale: torch.Tensor  # 0-dim float32: the loss is multiplied by it before backward
    loss: torch.Tensor  # 0-dim: the unscaled loss of the last replay


def _reset_generator_capture_state() -> None:
    """End the capture state a failed capture leaves in the CUDA generator (seen with PyTorch 2.11:
    every later random op then fails with "Offset increment outside graph capture"); an empty
    capture that succeeds resets it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The CUDA Graph is empty"
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    # One per device: cuBLAS keeps a workspace for every stream it has run on, for the process's life.
    return torch.cuda.Stream(device)


class StepGraphs:
    """`run(batch, scale)`: loss_fn(model, batch) forward, (loss·scale) backward, as a graph replay.

    `autocast_dtype`: bf16/fp16 autocast inside the graph, or None. Autocast's weight-cast cache is
    off: cached casts would be freed when the captured region ends.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: list[nn.Parameter],
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 2,
    ) -> None:
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.autocast_dtype, self.warmup = autocast_dtype, warmup
        self.device = params[0].device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def run(self, batch: dict[str, torch.Tensor], scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Adds d(loss·scale)/dθ into every parameter's `.grad`; returns the loss (a new 0-dim tensor)."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(key, batch)
            except RuntimeError as error:
                _reset_generator_capture_state()
                if isinstance(error, torch.OutOfMemoryError):
                    raise  # the caller decides (the worker retries with a smaller micro-batch)
                raise CaptureError(str(error)) from error
        for name, tensor in batch.items():
            captured.batch[name].copy_(tensor, non_blocking=True)
        if isinstance(scale, torch.Tensor):
            captured.scale.copy_(scale)
        else:
            captured.scale.fill_(scale)
        captured.graph.replay()
        return captured.loss.clone()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _forward_backward(self, batch: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            loss = self.loss_fn(self.model, batch)
        (loss * scale).backward()
        return loss.detach()

    def _capture(self, key: tuple, batch: dict[str, torch.Tensor]) -> _Captured:
        static = {name: tensor.clone() for name, tensor in batch.items()}
        scale = torch.ones((), dtype=torch.float32, device=self.device)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        kept = [g.clone() for g in grads]
        side = _warmup_stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward_backward(static, scale)
        torch.cuda.current_stream().wait_stream(side)
        torch._foreach_copy_(grads, kept)
        del kept
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._forward_backward(static, scale)
        if any(p.grad is not g for p, g in zip(self.params, grads, strict=True)):
            raise RuntimeError(
                "autograd replaced .grad tensors during capture: a replay would not update them"
            )
        captured = _Captured(graph, static, scale, loss)
        self.graphs[key] = captured
        return captured

"""Per-row LoRA: one frozen base layer, many adapters, each row of a batch using its own.

Every targeted linear of a resident base is wrapped in a `MultiLoraLinear` holding an adapter
*bank*: `lora_A` [slots, rank, in_features] and `lora_B` [slots, out_features, rank], the adapter's
scaling folded into B. Slot 0 is all zeros and means "no adapter". Adapters of smaller rank are
zero-padded to the bank's rank, which leaves B·A unchanged. All wrapped layers of one base share a
`LoraPlan` naming the slot of every row of the batch about to run.

A batch on one adapter runs two plain matmuls against views of the bank; a batch mixing adapters
gathers each row's A and B and runs two batched matmuls (`bmm`), so its cost does not grow with
the number of distinct adapters. The base layer runs once for the whole batch either way; a GPTQ
base on a GPU goes straight to `gpu_kernels.gptq_matmul` (the fused low-bit kernel at decode sizes)
and a QuIP# base to its transforms and E8P decode-matmul, skipping the training-side autograd wrapper.
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_kernels.gptq_matmul import gptq_matmul
from modulora.quant.gptq_packed import GPTQLinear
from modulora.quant.quip import E8PLinear, E8PProjections


def base_product(layer: nn.Module | E8PProjections, x: torch.Tensor) -> torch.Tensor:
    """A frozen base layer's output (or fused QuIP# projections' side by side); a GPTQ or QuIP#
    layer on a GPU goes straight to the low-bit kernels."""
    if isinstance(layer, E8PProjections):
        return layer.matmul(x)
    if x.is_cuda and isinstance(layer, E8PLinear):
        y = layer.matmul(x)
        return y if layer.bias is None else y + layer.bias.to(y.dtype)
    if not (x.is_cuda and isinstance(layer, GPTQLinear)):
        return layer(x)
    y = gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.zero_offset)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


class LoraPlan:
    """The adapter slot of each row of the next forward (shared by all layers of one base)."""

    def __init__(self) -> None:
        self.slot_ids: torch.Tensor | None = None  # int64 [batch]
        self.single: int | None = 0  # the one slot every row uses, or None when rows differ

    def set(self, slots: list[int], device: torch.device) -> None:
        self.single = slots[0] if len(set(slots)) == 1 else None
        self.slot_ids = torch.tensor(slots, dtype=torch.int64, device=device)


class MultiLoraLinear(nn.Module):
    """y[b] = base(x[b]) + B[s_b]·A[s_b]·x[b] with s_b the adapter slot of row b."""

    def __init__(
        self, base_layer: nn.Module, plan: LoraPlan, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.plan = plan
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.register_buffer("lora_A", torch.zeros(1, 0, self.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(1, self.out_features, 0, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def resize_(self, slots: int, rank: int) -> None:
        """Grow (never shrink) the bank to `slots` slots of rank `rank`, keeping what is loaded."""
        if slots <= self.slots and rank <= self.rank:
            return
        slots, rank = max(slots, self.slots), max(rank, self.rank)
        a = self.lora_A.new_zeros(slots, rank, self.in_features)
        b = self.lora_B.new_zeros(slots, self.out_features, rank)
        a[: self.slots, : self.rank] = self.lora_A
        b[: self.slots, :, : self.rank] = self.lora_B
        self.lora_A, self.lora_B = a, b

    @torch.no_grad()
    def load_slot_(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's A [r, in] and B [out, r] (None: this adapter skips the layer) into `slot`."""
        if slot == 0:
            raise ValueError("slot: 0 is the reserved empty slot")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        # Scale in float32 before the cast so the bank holds round(B·s), as close as the dtype allows.
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)
        self.lora_B[slot, :, :r] = (b.float() * scaling).to(self.lora_B.dtype)

    @torch.no_grad()
    def clear_slot_(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x [batch, tokens, in_features] -> [batch, tokens, out_features].

        `base`: the base layer's output for x when a fused product already computed it.
        """
        y = base_product(self.base_layer, x) if base is None else base
        single = self.plan.single
        if self.rank == 0 or single == 0:
            return y
        h = x.to(self.lora_A.dtype)
        if single is not None:
            delta = (h @ self.lora_A[single].T) @ self.lora_B[single].T
        else:
            a = self.lora_A[self.plan.slot_ids]  # [batch, r, in]
            b = self.lora_B[self.plan.slot_ids]  # [batch, out, r]
            delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, slots={self.slots}, rank={self.rank}"

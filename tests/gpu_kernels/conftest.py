"""Kernel tests run twice: on CPU under Triton's interpreter (CI) and on a CUDA device (`-m gpu`)."""

import pytest
import torch

from modulora.quant.gptq_packed import GPTQLinear


@pytest.fixture(params=["interpret", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device the kernel runs on; on CPU the kernels run under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if request.param == "interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda")


def random_gptq_layer(
    in_features: int, out_features: int, group_size: int, act_order: bool, bits: int, device: torch.device
) -> GPTQLinear:
    """A GPTQ layer with random codes, zero points and scales (scales ~1/8, so outputs stay O(1))."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features))
    zeros = torch.randint(1, 2**bits, (groups, out_features))
    scales = (torch.rand(groups, out_features) + 0.1) / 8
    g_idx = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features)]
    return GPTQLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size, desc_act=act_order).to(device)

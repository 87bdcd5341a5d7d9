"""The fused E8P decode-matmul (few rows) against decode + dense matmul.

Tolerance: fp16/bf16 operands (every E8P value is exact in both), fp32 accumulation, one rounding
of the output: relative error ~2^-9 (bf16) of the result norm; we allow 1e-2.
"""

import pytest
import torch

from gpu_kernels.e8p import e8p_decode_ref
from gpu_kernels.e8p_matmul import e8p_matmul, e8p_matmul_triton


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"), [(1, 72, 200), (5, 64, 256), (16, 130, 128)], ids=str
)
def test_fused_matmul_matches_decode_then_matmul(
    device: torch.device, rows: int, out_features: int, in_features: int, dtype: torch.dtype
) -> None:
    codes = torch.randint(-(2**15), 2**15, (out_features, in_features // 8), dtype=torch.int16, device=device)
    x = (torch.randn(rows, in_features, device=device) / in_features**0.5).to(dtype)
    got = e8p_matmul_triton(x, codes)
    want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
    assert got.dtype == dtype and got.shape == (rows, out_features)
    assert ((got.cpu().double() - want).norm() / want.norm()).item() < 1e-2


def test_dispatch_keeps_leading_dims_and_falls_back_for_many_rows(device: torch.device) -> None:
    codes = torch.randint(-(2**15), 2**15, (48, 8), dtype=torch.int16, device=device)
    for shape in [(2, 3, 64), (40, 64)]:  # 6 rows fused, 40 rows through decode + F.linear
        x = torch.randn(shape, device=device).bfloat16()
        want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
        got = e8p_matmul(x, codes)
        assert got.shape == (*shape[:-1], 48)
        assert ((got.cpu().double() - want).norm() / want.norm()).item() < 1e-2


def test_fused_matmul_rejects_too_many_rows(device: torch.device) -> None:
    codes = torch.zeros(8, 8, dtype=torch.int16, device=device)
    with pytest.raises(ValueError, match="x: \\(17, 64\\)"):
        e8p_matmul_triton(torch.zeros(17, 64, device=device).half(), codes)

"""The fused few-row E8P decode-matmul (split-K, one kernel) against decode + dense matmul.

Tolerance: fp16/bf16 operands (every E8P value is exact in both), fp32 accumulation, one rounding
of the output: relative error ~2^-9 (bf16) of the result norm; we allow 1e-2.
"""

import pytest
import torch

from gpu_kernels.e8p import e8p_decode_ref
from gpu_kernels.e8p_matmul import (
    e8p_matmul,
    e8p_matmul_grouped,
    e8p_matmul_triton,
    matmul_candidates,
)


def random_codes(out_features: int, in_features: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2**15), 2**15, (out_features, in_features // 8), generator=generator)
    return codes.to(torch.int16).to(device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 72, 200), (1, 256, 1024), (5, 64, 256), (16, 130, 128)],
    ids=str,
)
def test_fused_matmul_matches_decode_then_matmul(
    device: torch.device, rows: int, out_features: int, in_features: int, dtype: torch.dtype
) -> None:
    codes = random_codes(out_features, in_features, device)
    x = (torch.randn(rows, in_features, device=device) / in_features**0.5).to(dtype)
    got = e8p_matmul_triton(x, codes)
    want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
    assert got.dtype == dtype and got.shape == (rows, out_features)
    assert relative_error(got, want) < 1e-2


@pytest.mark.parametrize("rows", [1, 3])
def test_every_form_tile_and_split_sums_the_whole_reduction(device: torch.device, rows: int) -> None:
    # 72 code words: splits that do and do not divide them, the CUDA-core (one row) and tensor-core forms.
    codes = random_codes(96, 576, device, seed=1)
    x = torch.randn(rows, 576, device=device).bfloat16()
    want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
    candidates = matmul_candidates(rows, 72, [])
    assert {c["ROWS"] for c in candidates} == ({1, 16} if rows == 1 else {16})
    for config in candidates:
        assert relative_error(e8p_matmul_triton(x, codes, config=config), want) < 1e-2, config
        # The workspace is left zero: the next call's sums start from nothing.
        assert relative_error(e8p_matmul_triton(x, codes, config=config), want) < 1e-2, config


def test_grouped_inputs_feed_their_own_columns(device: torch.device) -> None:
    # q, k and v of a GQA block at a decode step: each rotated by its own signs, one product.
    widths = [128, 64, 64]
    codes = random_codes(sum(widths), 256, device, seed=2)
    x = torch.randn(2, 3, 256, device=device).bfloat16()
    got = e8p_matmul_grouped(x, codes, widths)
    dense = e8p_decode_ref(codes.cpu(), torch.float64)
    starts = [0, 128, 192, 256]
    want = torch.cat([x[:, i].double().cpu() @ dense[starts[i] : starts[i + 1]].T for i in range(3)], -1)
    assert got.shape == (2, 256)
    assert relative_error(got, want) < 1e-2


def test_dispatch_keeps_leading_dims_and_falls_back_for_many_rows(device: torch.device) -> None:
    codes = random_codes(48, 64, device, seed=3)
    for shape in [(2, 3, 64), (40, 64)]:  # 6 rows fused, 40 rows through decode + F.linear
        x = torch.randn(shape, device=device).bfloat16()
        want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
        got = e8p_matmul(x, codes)
        assert got.shape == (*shape[:-1], 48)
        assert relative_error(got, want) < 1e-2


def test_fused_matmul_rejects_too_many_rows_and_bad_widths(device: torch.device) -> None:
    codes = torch.zeros(64, 8, dtype=torch.int16, device=device)
    with pytest.raises(ValueError, match="x: \\(17, 64\\)"):
        e8p_matmul_triton(torch.zeros(17, 64, device=device).half(), codes)
    with pytest.raises(ValueError, match="widths: \\[32, 16\\] must give"):
        e8p_matmul_triton(torch.zeros(1, 2, 64, device=device).half(), codes, widths=[32, 16])
    with pytest.raises(ValueError, match="widths: \\[40, 24\\]; input boundaries must be multiples of 32"):
        e8p_matmul_triton(torch.zeros(1, 2, 64, device=device).half(), codes, widths=[40, 24])

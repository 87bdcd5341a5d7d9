"""The batch-1 decode kernel (x·Wᵀ from packed 2/4/8-bit codes) against the float64 reference.

Tolerance as for the fused matmul: fp32 accumulation, one rounding to fp16 at the end.
"""

import pytest
import torch

from gpu_kernels._dispatch import split_k_workspace
from gpu_kernels.gptq_gemv import (
    gemv_candidates,
    gemv_supports,
    gemv_tile_words,
    gptq_gemv,
    gptq_gemv_ref,
    words_per_split,
)
from gpu_kernels.gptq_matmul import gptq_matmul
from modulora.quant.gptq_packed import GPTQLinear
from tests.gpu_kernels.conftest import random_gptq_layer
from tests.gpu_kernels.test_gptq_matmul import RTOL, relative_error


def buffers(layer) -> tuple:
    return layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "shape",  # (in, out, group size): odd widths, a partial last word, per-channel scales, small groups
    [(256, 72, 128), (130, 40, -1), (300, 50, 64), (96, 33, 32)],
    ids=str,
)
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_reference(device: torch.device, bits: int, shape: tuple, rows: int) -> None:
    layer = random_gptq_layer(*shape, act_order=False, bits=bits, device=device)
    x = torch.randn(rows, layer.in_features, device=device).half()
    got = gptq_gemv(x, *buffers(layer))
    want = gptq_gemv_ref(x.double(), *buffers(layer))
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert relative_error(got, want) < RTOL


@pytest.mark.parametrize("bits", [2, 4])
def test_gemv_outlier_activations_do_not_overflow_the_fp16_pair_sums(device: torch.device, bits: int) -> None:
    """On a GPU codes multiply in fp16 pairs; a whole word of inputs at 4,000 (LLaMA's outlier
    channels reach a few thousand) must still give the float64 product."""
    layer = random_gptq_layer(256, 48, 128, act_order=False, bits=bits, device=device)
    x = torch.randn(1, layer.in_features, device=device, generator=torch.Generator(device).manual_seed(0))
    x[0, : 32 // bits] = 4000.0
    got = gptq_gemv(x, *buffers(layer))
    assert torch.isfinite(got).all()
    assert relative_error(got, gptq_gemv_ref(x.double(), *buffers(layer))) < RTOL


def test_gemv_codes_at_every_position_of_a_word_decode_exactly(device: torch.device) -> None:
    """The in-place float trick must give q - z exactly for every code value at every bit position."""
    for bits in (2, 4, 8):
        out_features, in_features = 2**bits, 32 // bits * 4
        codes = torch.arange(out_features)[:, None].expand(out_features, in_features)
        exact = GPTQLinear.from_codes(
            codes, torch.ones(1, out_features), torch.ones(1, out_features, dtype=torch.long),
            torch.zeros(in_features, dtype=torch.int32), bits, -1,
        ).to(device)  # fmt: skip
        x = torch.eye(in_features, device=device)  # row i picks input channel i alone
        for i in range(0, in_features, 3):
            got = gptq_gemv(x[i : i + 1], *buffers(exact))
            assert torch.equal(got[0], (torch.arange(out_features, device=device) - 1).float())


@pytest.mark.parametrize("which", ["first", "second", "last (register cap)", "odd split"])
def test_gemv_every_candidate_tile_and_split_gives_the_same_product(device: torch.device, which: str) -> None:
    """Splits add partial sums with atomics; a split edge must neither skip nor double count words."""
    layer = random_gptq_layer(512, 96, group_size=64, act_order=False, bits=4, device=device)
    x = torch.randn(1, 512, device=device).half()
    candidates = gemv_candidates(512, 96, 4, gemv_tile_words(4, 64, 8))
    config = {
        "first": candidates[0],
        "second": candidates[1],
        "last (register cap)": candidates[-1],
        "odd split": dict(BLOCK_W=4, BLOCK_N=32, SPLIT_K=3, num_warps=4),
    }[which]
    got = gptq_gemv(x, *buffers(layer), config=config)
    want = gptq_gemv_ref(x.double(), *buffers(layer))
    assert relative_error(got, want) < RTOL


@pytest.mark.parametrize(
    "words, split, block_w, divides",  # 7B's 4096 and 11008 inputs at 4 bits, and two without a divisor
    [(512, 128, 4, True), (1376, 128, 4, True), (1376, 32, 8, True), (17, 3, 4, False), (18, 4, 4, False)],
)
def test_words_per_split_takes_whole_tiles_and_a_divisor_of_the_words_where_one_is_near(
    words: int, split: int, block_w: int, divides: bool
) -> None:
    """A split that divides the words spares every program the bounds checks (the kernel's EVEN)."""
    per_split = words_per_split(words, split, block_w)
    assert per_split % block_w == 0
    assert (words % per_split == 0) == divides
    programs = -(-words // per_split)
    assert programs * per_split >= words > (programs - 1) * per_split
    assert split / 2 <= programs <= 2 * split


def test_split_k_leaves_its_workspace_zero_for_the_next_call(device: torch.device) -> None:
    """The last program per column block writes the output and zeroes the sums and counters, so
    back-to-back calls of different shapes share one workspace and each gets its own product."""
    split = dict(BLOCK_W=2, BLOCK_N=32, SPLIT_K=3, num_warps=4)  # tiles within 2-bit's 2-word groups
    layers = [
        random_gptq_layer(512, 96, group_size=64, act_order=False, bits=4, device=device),
        random_gptq_layer(256, 40, group_size=32, act_order=False, bits=2, device=device),
    ]
    for _ in range(2):
        for layer in layers:
            x = torch.randn(2, layer.in_features, device=device).half()
            got = gptq_gemv(x, *buffers(layer), config=split)
            assert relative_error(got, gptq_gemv_ref(x.double(), *buffers(layer))) < RTOL
            acc, arrivals = split_k_workspace(device, 0, 0)
            assert not acc.any() and not arrivals.any()


@pytest.mark.gpu
def test_timing_a_new_shape_leaves_the_workspace_to_the_products_still_queued() -> None:
    """The first call of a shape times every candidate on a stream of Triton's own; products queued
    before it on this stream share the split-K workspace and must still come out right (before
    `fastest_config` synchronized, such timings left wrong sums in the workspace)."""
    device = torch.device("cuda")
    tuned = random_gptq_layer(4096, 4096, group_size=128, act_order=False, bits=4, device=device)
    x = torch.randn(1, 4096, device=device).half()
    want = gptq_gemv_ref(x.double(), *buffers(tuned))
    gptq_gemv(x, *buffers(tuned))
    for in_features, out_features in [(1024, 3072), (2048, 1536), (3072, 1024)]:
        fresh = random_gptq_layer(
            in_features, out_features, group_size=128, act_order=False, bits=4, device=device
        )
        x_fresh = torch.randn(1, in_features, device=device).half()
        queued = [gptq_gemv(x, *buffers(tuned)) for _ in range(50)]
        got = gptq_gemv(x_fresh, *buffers(fresh))
        assert all(relative_error(y, want) < RTOL for y in queued)
        assert relative_error(got, gptq_gemv_ref(x_fresh.double(), *buffers(fresh))) < RTOL
        acc, arrivals = split_k_workspace(device, 0, 0)
        assert not acc.any() and not arrivals.any()


def test_gemv_is_what_gptq_matmul_runs_for_one_row(device: torch.device) -> None:
    layer = random_gptq_layer(128, 64, group_size=32, act_order=False, bits=4, device=device)
    x = torch.randn(1, 1, 128, device=device).half()
    got = gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4)
    assert got.shape == (1, 1, 64)
    assert torch.equal(got, gptq_gemv(x, *buffers(layer)))


def test_gemv_rejects_what_it_cannot_compute(device: torch.device) -> None:
    layer = random_gptq_layer(64, 32, group_size=32, act_order=False, bits=4, device=device)
    with pytest.raises(ValueError, match="in_features=64"):
        gptq_gemv(torch.randn(1, 65, device=device).half(), *buffers(layer))
    for bits, act_order in ((3, False), (4, True)):
        other = random_gptq_layer(64, 32, group_size=32, act_order=act_order, bits=bits, device=device)
        assert not gemv_supports(other.bits, other.g_idx, other.scales)
        with pytest.raises(ValueError, match="bits="):
            gptq_gemv(torch.randn(1, 64, device=device).half(), *buffers(other))

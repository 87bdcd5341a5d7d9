"""The Hadamard transform: equals the dense matrix product, inverts itself, Triton equals the reference
for every order the models use, with the sign scalings and casts fused in."""

import importlib
import math

import pytest
import torch

from gpu_kernels import hadamard, hadamard_factors, hadamard_matrix, hadamard_ref

hadamard_module = importlib.import_module(
    "gpu_kernels.hadamard"
)  # the package exports a function of that name

# SmolLM2-135M/360M (192, 576, 960, 1536, 2560) and LLaMA 7B-65B (4096, 5120, 6656, 8192, 11008,
# 13824, 17920, 22016) dimensions.
MODEL_DIMS = [192, 576, 960, 1536, 2560, 4096, 5120, 6656, 8192, 11008, 13824, 17920, 22016]
# Every order the Triton kernels must run: powers of two, and K·2^p for each Paley factor above.
GPU_ORDERS = [4096, 5120, 8192, 11008, 13824, 22016]
TRANSFORM_ORDERS = [2**p for p in range(6, 15)] + [
    576,
    960,
    1536,
    2560,
    5120,
    6656,
    11008,
    13824,
    17920,
    22016,
]


@pytest.mark.parametrize("n", MODEL_DIMS)
def test_factors_of_model_dims_give_orthogonal_hadamard(n: int) -> None:
    k, p = hadamard_factors(n)
    assert k * p == n and p & (p - 1) == 0
    if k > 1:
        small = hadamard_module._small_hadamard(k).double()
        assert set(small.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(small @ small.T, k * torch.eye(k, dtype=torch.float64), rtol=0, atol=0)


def test_factors_reject_order_without_built_in_matrix() -> None:
    with pytest.raises(ValueError, match="n: no Hadamard matrix of order 184"):
        hadamard_factors(184)  # 23·8: neither 92 nor 184 is a Paley order


@pytest.mark.parametrize("n", [2, 12, 48, 64, 192, 576])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_equals_dense_matrix_product(n: int, transpose: bool) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    dense = hadamard_matrix(n, torch.float64)
    expected = x @ (dense if transpose else dense.T)
    # fp32 accumulation: ~1e-7 relative error per element.
    torch.testing.assert_close(hadamard_ref(x, transpose), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_hadamard_is_orthonormal_and_inverted_by_its_transpose(n: int) -> None:
    x = torch.randn(7, n)
    y = hadamard_ref(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(hadamard_ref(y, transpose=True), x, rtol=1e-5, atol=1e-5)


def test_unnormalized_power_of_two_transform_is_its_own_inverse_up_to_n() -> None:
    x = torch.randn(4, 256)
    twice = hadamard_ref(hadamard_ref(x, scale=1.0), scale=1.0)
    torch.testing.assert_close(twice, 256 * x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "transpose"), [((3, 48), False), ((5, 7, 192), True), ((1, 64), False), ((9, 2), True)]
)
def test_triton_equals_reference(
    device: torch.device, shape: tuple[int, ...], transpose: bool, dtype: torch.dtype
) -> None:
    x = torch.randn(shape, device=device).to(dtype)
    y = hadamard(x, transpose)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # both accumulate in fp32; bf16 rounds the result
    torch.testing.assert_close(y, hadamard_ref(x, transpose), rtol=tol, atol=tol * math.sqrt(shape[-1]))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", TRANSFORM_ORDERS)
def test_triton_with_signs_equals_reference_for_every_model_order(
    device: torch.device, n: int, transpose: bool
) -> None:
    if device.type == "cuda" and n not in GPU_ORDERS:
        pytest.skip(
            "on a GPU only LLaMA 7B-65B's orders (each compiles its own kernels); all run interpreted"
        )
    generator = torch.Generator().manual_seed(n)
    x, su, sv = (torch.randn(shape, generator=generator).to(device) for shape in ((3, n), (n,), (n,)))
    y = hadamard(x, transpose, pre_scale=su, post_scale=sv)
    want = hadamard_ref(x.cpu(), transpose, pre_scale=su.cpu(), post_scale=sv.cpu())
    # fp32 in and out: the K-factor dot takes x·su as three bf16 pieces (fp32's 24 bits).
    torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [576, 1536])
def test_half_precision_inputs_without_pre_scale_are_transformed_exactly(
    device: torch.device, n: int, dtype: torch.dtype
) -> None:
    # One bf16 piece holds a bf16 value and two an fp16 one: the dot rounds nothing but its fp32 sums.
    x = torch.randn(4, n, device=device).to(dtype)
    assert hadamard_module.dot_pieces(dtype, has_pre_scale=False) == (1 if dtype == torch.bfloat16 else 2)
    y = hadamard(x, transpose=True, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    want = hadamard_ref(x.cpu(), transpose=True, out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [192, 256])
def test_grouped_scales_transform_one_input_under_each_sign_vector(device: torch.device, n: int) -> None:
    # x [rows, 1, n] under su [3, n]: the inputs of q, k and v at a decode step, in one launch.
    x = torch.randn(2, 1, n, device=device).bfloat16()
    su, sv = torch.randn(3, n, device=device), torch.randn(3, n, device=device)
    y = hadamard(x, pre_scale=su, post_scale=sv)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    for i in range(3):
        want = hadamard_ref(x[:, 0].cpu(), pre_scale=su[i].cpu(), post_scale=sv[i].cpu())
        torch.testing.assert_close(y[:, i].cpu(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [48, 128])
def test_out_writes_into_a_strided_view_and_leaves_the_rest(device: torch.device, n: int) -> None:
    # The output transform of fused projections writes each run of layers into its columns.
    y = torch.randn(5, 3 * n, device=device)
    out = torch.full((5, 4 * n), 7.0, device=device)
    sv = torch.randn(3, n, device=device)
    view = out[:, n:].view(5, 3, n)
    assert hadamard(y.view(5, 3, n), transpose=True, post_scale=sv, out=view) is view
    want = hadamard_ref(y.view(5, 3, n).cpu(), transpose=True, post_scale=sv.cpu())
    torch.testing.assert_close(out[:, n:].view(5, 3, n).cpu(), want, rtol=1e-5, atol=1e-5)
    assert (out[:, :n] == 7.0).all()


# 688 = 344·2: six blocks of 64 over the padded K; 5120 = 20·256: the dot form folds 4 into K.
@pytest.mark.parametrize("n", [576, 688, 4096, 5120])
@pytest.mark.parametrize("transpose", [False, True])
def test_every_form_and_tile_equals_reference(device: torch.device, n: int, transpose: bool) -> None:
    k, p = hadamard_factors(n)
    x, su = torch.randn(5, n, device=device), torch.randn(n, device=device)
    want = hadamard_ref(x.cpu(), transpose, pre_scale=su.cpu())
    candidates = hadamard_module.hadamard_candidates(k, p, rows=5)
    # Butterflies and, for a few rows of P >= 16, dots.
    assert {c["RIGHT_DOT"] for c in candidates} == ({0, 1} if p >= 16 else {0})
    if device.type == "cpu":  # warps change nothing in the interpreter
        candidates = list({(c["BLOCK_M"], c.get("BLOCK_K"), c["RIGHT_DOT"]): c for c in candidates}.values())
    for config in candidates:
        y = hadamard_module.hadamard_triton(x, transpose, pre_scale=su, config=config)
        torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-5, msg=str(config))


def test_dot_form_is_timed_for_decode_rows_only() -> None:
    forms = {
        rows: {c["RIGHT_DOT"] for c in hadamard_module.hadamard_candidates(344, 32, rows)}
        for rows in (1, 512)
    }
    assert forms == {1: {0, 1}, 512: {0}}


def test_bad_scale_and_out_shapes_name_the_argument(device: torch.device) -> None:
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"scale: shape \(32,\); need \[64\]"):
        hadamard_module.hadamard_triton(x, pre_scale=torch.ones(32, device=device))
    with pytest.raises(ValueError, match=r"out: shape \(2, 32\)"):
        hadamard_module.hadamard_triton(x, out=torch.empty(2, 32, device=device))


def test_k_factor_tables_are_built_once_per_device_and_refused_during_capture(monkeypatch) -> None:
    # A host tensor copied to the GPU inside CUDA-graph capture fails (issue 22): the table is built
    # by the first call, outside capture, and a first call during capture says what to do.
    dispatch = importlib.import_module("gpu_kernels._dispatch")
    monkeypatch.setattr(dispatch, "_constants", {})
    first = hadamard_module.hadamard_table(12, 1, torch.device("cpu"))
    assert hadamard_module.hadamard_table(12, 1, torch.device("cpu")) is first
    assert first.shape == (64, 64) and not first[12:].any() and not first[:, 12:].any()
    folded = hadamard_module.hadamard_table(12, 8, torch.device("cpu"))  # H_12 ⊗ H_8, padded to 128
    assert folded.shape == (128, 128) and torch.equal(
        folded[:96, :96] @ folded[:96, :96].T, 96 * torch.eye(96)
    )
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(
        RuntimeError, match="hadamard_K12xH1_torch.float32: not yet on cuda:0; run the op once"
    ):
        hadamard_module.hadamard_table(12, 1, torch.device("cuda", 0))

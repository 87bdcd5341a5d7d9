"""QuIP#: exact E8P rounding, BlockLDLQ on a Hessian, the layer equals its dense reference, round trip."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_kernels import e8p_decode_ref
from modulora.quant import FORMATS, QuantConfig, get_quantizer
from modulora.quant.quip import E8PLinear, QuipQuantizer, e8p_quantize, proxy_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """BlockLDLQ runs thousands of tiny ops; a second thread only adds sync cost (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(n: int, tokens: int = 2048) -> torch.Tensor:
    """Activations with correlated channels and a few outlier channels, like a transformer's."""
    torch.manual_seed(1)
    x = torch.randn(tokens, n) @ (0.1 * torch.randn(n, n) + torch.eye(n))
    x[:, :4] *= 20
    return x


def quantize(
    out_features: int = 96, in_features: int = 192, **options
) -> tuple[QuipQuantizer, E8PLinear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight = 0.02 * torch.randn(out_features, in_features)
    x = correlated_inputs(in_features)
    hessian = 2 * x.T @ x / len(x)
    quantizer = get_quantizer(QuantConfig(method="quip#", bits=2, options=options))
    return quantizer, quantizer.quantize(weight, None, hessian), weight, hessian


def test_e8p_quantize_returns_the_nearest_codebook_point() -> None:
    codebook = e8p_decode_ref(
        torch.arange(65536, dtype=torch.int32).to(torch.int16).view(-1, 1), torch.float32
    )
    codebook = codebook.view(-1, 8).double()
    x = 1.1 * torch.randn(500, 8, dtype=torch.float64)
    decoded = e8p_decode_ref(e8p_quantize(x, candidates=4)[:, None], torch.float32).double()
    nearest = torch.cdist(x, codebook).min(dim=1).values
    torch.testing.assert_close((decoded - x).norm(dim=1), nearest, rtol=1e-6, atol=1e-6)


def test_ldlq_with_hessian_beats_rounding_and_rtn() -> None:
    quantizer, layer, weight, hessian = quantize(tune_signs=False)
    ldlq = proxy_loss(layer.materialize(torch.float32), weight, hessian)
    rounded = get_quantizer(QuantConfig(method="quip#", bits=2, options={"tune_signs": False})).quantize(
        weight, None, None
    )
    rtn = get_quantizer(QuantConfig(method="rtn", bits=2, group_size=64)).quantize(weight, None, None)
    # Measured on this seed: LDLQ 0.012, rotated nearest rounding 0.091, RTN 2-bit g64 0.24.
    assert ldlq < 0.5 * proxy_loss(rounded.materialize(torch.float32), weight, hessian)
    assert ldlq < 0.25 * proxy_loss(rtn.materialize(torch.float32), weight, hessian)
    assert quantizer.last_losses["ldlq"] == pytest.approx(ldlq, rel=1e-4)


def test_sign_tuning_lowers_the_proxy_loss() -> None:
    quantizer, layer, weight, hessian = quantize(tune_signs=True)
    assert quantizer.last_losses["tuned"] < quantizer.last_losses["ldlq"]
    assert not torch.equal(layer.su.abs(), torch.ones_like(layer.su))  # real-valued after tuning


@pytest.mark.parametrize("tune_signs", [False, True])
def test_forward_and_input_grad_match_materialized_dense(tune_signs: bool) -> None:
    _, layer, _, _ = quantize(out_features=192, in_features=96, tune_signs=tune_signs)
    dense = layer.materialize(torch.float32).double()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    grad_out = torch.randn(3, 5, layer.out_features)
    y = layer(x)
    y.backward(grad_out)
    # fp32 transforms and matmul against a float64 dense product: ~1e-6 relative.
    torch.testing.assert_close(y.double(), x.detach().double() @ dense.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad_out.double() @ dense, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_matches_dense_within_bf16_rounding() -> None:
    _, layer, _, _ = quantize()
    x = torch.randn(4, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = x @ layer.materialize(torch.float32).T
    # bf16 rounds the rotated input and the output (2^-8 relative each).
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_quantize_save_load_round_trip_through_formats(tmp_path) -> None:
    _, layer, _, _ = quantize()
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    assert layer.weight_bytes == 96 * 192 // 4 + 4 * (96 + 192)  # 2 bits a weight plus fp32 sign vectors
    empty = FORMATS[layer.format].empty(layer.in_features, layer.out_features, False, layer.format_config())
    empty.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    torch.testing.assert_close(
        empty.materialize(torch.float32), layer.materialize(torch.float32), rtol=0, atol=0
    )


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="bits: quip# supports 2, not 4"):
        get_quantizer(QuantConfig(method="quip#", bits=4))
    with pytest.raises(ValueError, match=r"options: unknown QuIP# options \['tune'\]"):
        get_quantizer(QuantConfig(method="quip#", bits=2, options={"tune": True}))
    with pytest.raises(ValueError, match="in_features: 100 must be a multiple of 8"):
        E8PLinear(100, 64)
    with pytest.raises(ValueError, match="n: no Hadamard matrix of order 184"):
        E8PLinear(184, 64)


def test_tiny_llama_quantizes_saves_and_loads_with_identical_logits(tmp_path) -> None:
    from modulora.models import load_model, save_quantized
    from modulora.quantize import quantize_
    from tests.utils.tiny_lm import tiny_llama, tiny_tokenizer

    model, ids = tiny_llama(), torch.randint(0, 400, (8, 64), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(method="quip#", bits=2, true_sequential=False)
    quantize_(model, config, ids, device="cpu")
    assert all(isinstance(layer.mlp.down_proj, E8PLinear) for layer in model.model.layers)
    save_quantized(model, tiny_tokenizer(), config, tmp_path)
    loaded, _ = load_model(tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)

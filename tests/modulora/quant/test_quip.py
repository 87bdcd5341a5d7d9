"""QuIP#: exact E8P rounding, BlockLDLQ on a Hessian, the layer equals its dense reference, round trip."""

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from gpu_kernels import e8p_decode_ref
from modulora.quant import FORMATS, QuantConfig, get_quantizer
from modulora.quant.quip import E8PLinear, QuipQuantizer, e8p_quantize, fuse_e8p_outputs_, proxy_loss


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


##### The layer through the kernels, fused projections, CUDA-graph safety, training parity #####


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels on CPU tensors under Triton's interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_e8p_layer(in_features: int, out_features: int, seed: int, device: str = "cpu") -> E8PLinear:
    """Random codes with real-valued signs (as after sign tuning); outputs of order 1 for x of order 1."""
    generator = torch.Generator().manual_seed(seed)
    layer = E8PLinear(in_features, out_features)
    with torch.no_grad():
        info = torch.iinfo(torch.int16)
        layer.codes.copy_(torch.randint(info.min, info.max + 1, layer.codes.shape, generator=generator))
        layer.su.copy_(torch.randn(in_features, generator=generator))
        layer.sv.copy_(torch.randn(out_features, generator=generator) / in_features**0.5)
    return layer.to(device)


def product_and_input_grad(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


@pytest.mark.parametrize(("rows", "dtype"), [(3, torch.bfloat16), (40, torch.bfloat16), (7, torch.float32)])
def test_layer_through_the_kernels_equals_the_reference(
    interpret: None, monkeypatch: pytest.MonkeyPatch, rows: int, dtype: torch.dtype
) -> None:
    # 96 = 12·8 and 160 = 20·8: both transforms carry a K factor. 3 bf16 rows take the fused
    # few-row decode-matmul, 40 rows decode + matmul, fp32 the fp32 path end to end.
    layer = random_e8p_layer(96, 160, seed=0)
    x = torch.randn(rows, 96).to(dtype)
    y, grad = product_and_input_grad(layer, x)
    monkeypatch.setenv("MODULORA_DISABLE_TRITON", "1")
    y_ref, grad_ref = product_and_input_grad(layer, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a rounding of the rotated input and the output
    for got, want in ((y, y_ref), (grad, grad_ref)):
        assert got.dtype == dtype
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


@pytest.mark.parametrize("mode", ["interpret", "reference"])
def test_fused_projections_equal_the_layers_alone(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # q, k, v of a GQA block: widths 96, 64, 64 (two runs of output orders), one input of 96.
    if mode == "interpret":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv("MODULORA_DISABLE_TRITON", "1")
    layers = [random_e8p_layer(96, width, seed=i) for i, width in enumerate((96, 64, 64))]
    x = torch.randn(2, 1, 96).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([layer.matmul(x) for layer in layers], dim=-1)
        fused = fuse_e8p_outputs_(layers)
        assert fused is not None and fused.runs == [(0, 1, 96), (96, 2, 64)]
        together = fused.matmul(x)
        after = torch.cat([layer.matmul(x) for layer in layers], dim=-1)  # views of the fused buffers
    assert together.shape == (2, 1, 224)
    assert ((together.float() - alone.float()).norm() / alone.float().norm()).item() < 2e-2
    torch.testing.assert_close(after, alone, rtol=0, atol=0)
    assert layers[1].codes.data_ptr() == fused.codes[96:].data_ptr()  # no code stored twice


def test_projections_that_cannot_share_a_product_are_not_fused() -> None:
    assert (
        fuse_e8p_outputs_([random_e8p_layer(96, 40, 0), random_e8p_layer(96, 48, 1)]) is None
    )  # boundary 40
    assert fuse_e8p_outputs_([random_e8p_layer(96, 64, 0), random_e8p_layer(192, 64, 1)]) is None
    assert fuse_e8p_outputs_([random_e8p_layer(64, 32, i) for i in range(4)]) is None  # > 3 inputs


class HostCopies(TorchDispatchMode):
    """Records every op that reads a host tensor into a tensor on another device: inside CUDA-graph
    capture each one fails (issue 22: "Cannot copy between CPU and CUDA tensors during CUDA graph
    capture unless the CPU tensor is pinned")."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type != "cpu" for t in outputs):
            self.ops.append(str(func))
        return result


class NoLaunch:
    """Stands in for `launchable(kernel)[grid](...)`: the launchers' host code runs, no kernel does."""

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_second_product_copies_nothing_from_the_host(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # On the meta device a host-to-device copy shows up as an op reading a CPU tensor, as it would in
    # CUDA-graph capture. The first call may build the device-resident tables (graph warm-ups make
    # it); the second, like every captured call, must not copy. The Triton path's launchers run
    # their host code (outputs, tables, workspaces) with the kernels stubbed out.
    if path == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for name in ("gpu_kernels.hadamard", "gpu_kernels.e8p", "gpu_kernels.e8p_matmul"):
            monkeypatch.setattr(importlib.import_module(name), "launchable", lambda kernel: NoLaunch())
    else:
        monkeypatch.setenv("MODULORA_DISABLE_TRITON", "1")
    meta = torch.device("meta")
    layer = E8PLinear(96, 160).to(meta)
    projections = [E8PLinear(96, width).to(meta) for width in (96, 64, 64)]
    fused = fuse_e8p_outputs_(projections)

    def products() -> None:  # what forward and backward run (autocast knows no meta device)
        for rows in (2, 40):  # a decode step's few rows and a training batch
            x = torch.randn(rows, 96, device=meta, dtype=torch.bfloat16)
            layer.matmul_t(layer.matmul(x))
        fused.matmul(torch.randn(1, 1, 96, device=meta, dtype=torch.bfloat16))

    products()
    with HostCopies() as copies:
        products()
    assert copies.ops == []


def test_host_copies_are_caught_on_meta() -> None:
    # The check above can fail: a table copied to the device every call (the bug it guards) is seen.
    with HostCopies() as copies:
        torch.ones(2, 2).to("meta")
    assert copies.ops == ["aten._to_copy.default"]


def e8p_llama(seed: int) -> torch.nn.Module:
    """A 1-layer LLaMA whose seven linears are random E8P layers. Hidden 96 = 12·8 and
    MLP 160 = 20·8 put a K factor in every transform; key/value width 48 = 12·4 a third order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    for i, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parent, _, leaf = name.rpartition(".")
            setattr(
                model.get_submodule(parent),
                leaf,
                random_e8p_layer(module.in_features, module.out_features, i),
            )
    return model


def lora_losses(steps: int) -> list[float]:
    from modulora.lora import LoraConfig, add_lora_

    model = e8p_llama(seed=0)
    add_lora_(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_twenty_training_steps_through_the_kernels_match_the_reference_losses(
    interpret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loss parity of the Hadamard and E8P kernels (Triton's interpreter, fp32) with their PyTorch
    # references: same model, data and initialization. bench/train_step.py --plan parity runs the
    # same comparison on a GPU in bf16.
    kernels = lora_losses(20)
    monkeypatch.setenv("MODULORA_DISABLE_TRITON", "1")
    reference = lora_losses(20)
    assert reference[-1] < reference[0] - 0.1  # the adapters learn: gradients flow through every base
    torch.testing.assert_close(kernels, reference, rtol=1e-5, atol=0)  # fp32 summation orders


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_graphed_training_step_equals_eager_step(autocast: torch.dtype | None) -> None:
    # The E8P forward and backward (transform kernels, decode, cuBLAS) replay from a CUDA graph.
    from modulora.lora import LoraConfig, add_lora_
    from modulora.step_graph import StepGraphs

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    model = e8p_llama(seed=0).cuda()
    add_lora_(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B != 0: every factor gets a gradient
    batch = {"input_ids": torch.randint(0, 256, (2, 24), device="cuda")}
    graphs = StepGraphs(model, loss_fn, params, autocast_dtype=autocast)
    graphs.run(batch)  # captures
    model.zero_grad(set_to_none=False)
    graphed_loss = graphs.run(batch)
    graphed = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
        eager_loss = loss_fn(model, batch)
    eager_loss.backward()
    tolerance = 1e-5 if autocast is None else 1e-2  # bf16: captured and eager cuBLAS calls round apart
    torch.testing.assert_close(graphed_loss, eager_loss.detach(), rtol=tolerance, atol=tolerance)
    for got, param in zip(graphed, params, strict=True):
        assert ((got - param.grad).norm() / param.grad.norm()).item() < tolerance


@pytest.mark.gpu
def test_decode_products_replay_from_a_cuda_graph() -> None:
    # What the inference engine captures: a one-row layer product and fused q/k/v, after one warm-up.
    layer = random_e8p_layer(96, 160, seed=0, device="cuda")
    qkv = fuse_e8p_outputs_(
        [random_e8p_layer(96, width, seed=i, device="cuda") for i, width in enumerate((96, 64, 64))]
    )
    x = torch.randn(1, 1, 96, device="cuda").bfloat16()
    with torch.inference_mode():
        outputs = (layer.matmul(x), qkv.matmul(x))  # warm-up: tables, tiles, workspaces
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = (layer.matmul(x), qkv.matmul(x))
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = (layer.matmul(x), qkv.matmul(x))
    for got, want, first in zip(captured, eager, outputs, strict=True):
        # Split-K partial sums arrive in any order: equal to fp32 rounding before the bf16 cast.
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
        assert not torch.equal(got, first)  # the replay read the new input

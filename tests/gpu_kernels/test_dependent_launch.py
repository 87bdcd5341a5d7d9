"""Programmatic dependent launch: kernels that start before the previous one ends still read its output.

With PDL a kernel's programs run while the kernel before it finishes, so a missing wait reads a
buffer before it is written. In a replayed CUDA graph that buffer still holds the previous replay's
values, so the chain below is replayed on fresh inputs each time and compared with the same chain
launched the ordinary way.
"""

import pytest
import torch

from gpu_kernels._dispatch import dependent_launch
from gpu_kernels.gptq_gemv import gptq_gemv
from gpu_kernels.rmsnorm import add_rmsnorm
from gpu_kernels.swiglu import silu_mul
from tests.gpu_kernels.conftest import random_gptq_layer
from tests.gpu_kernels.test_gptq_matmul import relative_error


def test_no_dependent_launch_off_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dependent_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dependent_launch(torch.device("cpu")) == {"PDL": False}


@pytest.mark.gpu
def test_dependent_launch_on_hopper_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    assert dependent_launch(device)["PDL"] == hopper
    monkeypatch.setenv("MODULORA_DISABLE_PDL", "1")
    assert dependent_launch(device) == {"PDL": False}


def _mlp_chain(x: torch.Tensor, gate_up: list, down: list, norm: torch.Tensor) -> torch.Tensor:
    """Rounds of h = norm(h + down(silu(gate)·up)): every kernel reads the one before it."""
    h, residual = add_rmsnorm(x, None, norm, 1e-5)
    for gate_up_layer, down_layer in zip(gate_up, down, strict=True):
        gate, up = gptq_gemv(h, *gate_up_layer).chunk(2, dim=-1)
        h, residual = add_rmsnorm(gptq_gemv(silu_mul(gate, up), *down_layer), residual, norm, 1e-5)
    return h


@pytest.mark.gpu
def test_graph_of_dependent_launches_matches_ordinary_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    hidden, inner, rounds = 512, 1024, 6

    def packed(in_features: int, out_features: int, bits: int) -> tuple:
        layer = random_gptq_layer(in_features, out_features, 128, False, bits, device)
        return layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits

    gate_up = [packed(hidden, 2 * inner, 4) for _ in range(rounds)]
    down = [packed(inner, hidden, 2) for _ in range(rounds)]
    norm = torch.rand(hidden, device=device).half() + 0.5
    static_x = torch.randn(1, hidden, device=device).half()
    for _ in range(2):  # tile choice and compilation happen outside the capture
        _mlp_chain(static_x, gate_up, down, norm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _mlp_chain(static_x, gate_up, down, norm)
    for seed in range(3):
        x = torch.randn(1, hidden, device=device, generator=torch.Generator(device).manual_seed(seed)).half()
        static_x.copy_(x)
        graph.replay()
        got = static_out.clone()
        with monkeypatch.context() as ordinary:
            ordinary.setenv("MODULORA_DISABLE_PDL", "1")
            want = _mlp_chain(x, gate_up, down, norm)
        assert relative_error(got, want) < 1e-2

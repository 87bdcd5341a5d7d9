"""The Triton NF4 materialize kernel reproduces `materialize_nf4_ref` exactly."""

import pytest
import torch

from gpu_kernels.materialize_nf4 import materialize_nf4, materialize_nf4_ref, materialize_nf4_triton


@pytest.mark.parametrize(
    "shape", [(37, 50), (64, 64), (3, 2100)], ids=str
)  # padded last block, exact, multi-program
@pytest.mark.parametrize("block_size", [64, 32])
def test_materialize_nf4_matches_reference_exactly(
    device: torch.device, shape: tuple, block_size: int
) -> None:
    out_features, in_features = shape
    n_blocks = -(-out_features * in_features // block_size)
    packed = torch.randint(0, 256, (n_blocks * block_size // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n_blocks, device=device)
    got = materialize_nf4_triton(packed, absmax, out_features, in_features, block_size, torch.float32)
    want = materialize_nf4_ref(packed, absmax, out_features, in_features, block_size, torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    public = materialize_nf4(packed, absmax, out_features, in_features, block_size, torch.float32)
    torch.testing.assert_close(public, want, rtol=0, atol=0)


def test_materialize_nf4_rejects_odd_block_size(device: torch.device) -> None:
    packed = torch.zeros(8, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="block_size: 3"):
        materialize_nf4_triton(packed, torch.ones(6, device=device), 4, 4, 3)

"""The Triton GGUF materialize kernel reproduces `materialize_gguf_ref` exactly for Q4_0/Q4_1/Q8_0."""

import pytest
import torch

from gpu_kernels.materialize_gguf import (
    GGUF_QTYPES,
    materialize_gguf,
    materialize_gguf_ref,
    materialize_gguf_triton,
)


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
@pytest.mark.parametrize(
    "shape", [(5, 96), (3, 32), (70, 64)], ids=str
)  # odd rows, one block, several programs
def test_materialize_gguf_matches_reference_exactly(device: torch.device, qtype: str, shape: tuple) -> None:
    rows, cols = shape
    if qtype == "q8_0":
        qs = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=device)
    else:
        qs = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, device=device)
    scales = torch.rand(rows, cols // 32, device=device).half()
    mins = torch.randn(rows, cols // 32, device=device).half() if qtype == "q4_1" else None
    want = materialize_gguf_ref(qs, scales, mins, qtype, torch.float32)
    torch.testing.assert_close(
        materialize_gguf_triton(qs, scales, mins, qtype, torch.float32), want, rtol=0, atol=0
    )
    torch.testing.assert_close(materialize_gguf(qs, scales, mins, qtype, torch.float32), want, rtol=0, atol=0)


def test_materialize_gguf_rejects_unknown_qtype(device: torch.device) -> None:
    qs = torch.zeros(1, 16, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="q5_0"):
        materialize_gguf_triton(qs, torch.ones(1, 1, device=device), None, "q5_0")

"""Shared test set-up.

All tests share one storage root (`MODULORA_HOME`), by default `.cache/test-home` in the repo, so
the real SmolLM2 is converted from GGUF once per checkout and reused by every test and every
subprocess (workers, servers) the tests start.
"""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MODULORA_HOME", str(REPO / ".cache" / "test-home"))
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.fail(f"the shared datasets are missing at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The built-in SmolLM2-135M-Instruct as a dequantized safetensors folder (converted once, cached)."""
    from modulora.models import resolve_model

    return resolve_model("smollm2-135m-instruct")

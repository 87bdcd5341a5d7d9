import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modulora.models import load_tokenizer
from modulora.serve.engine import InferenceEngine
from modulora.serve.types import EngineConfig
from tests.modulora.serve.factories import export_random_adapter, random_adapter, tiny_quantized_llama


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_base(tokenizer: Any) -> torch.nn.Module:
    return tiny_quantized_llama(len(tokenizer))


@pytest.fixture(scope="session")
def adapters(
    tiny_base: torch.nn.Module, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Any]]:
    """Three PEFT adapters of the tiny base: name -> (folder, reference model with that adapter)."""
    made = {}
    for seed, (name, r, targets) in enumerate([("ft-a", 4, "all-linear"), ("ft-b", 8, "all-linear"),
                                               ("ft-c", 2, ["q_proj", "v_proj"])], start=1):  # fmt: skip
        model = copy.deepcopy(tiny_base)
        random_adapter(model, seed=seed, r=r, targets=targets)
        # ft-a carries the tokenizer (and so its chat template) like a worker's export does.
        tokenizer_or_none = tokenizer if name == "ft-a" else None
        made[name] = (
            export_random_adapter(model, tmp_path_factory.mktemp(name), r, tokenizer_or_none),
            model,
        )
    return made


@pytest.fixture
def make_engine(tiny_base: torch.nn.Module, tokenizer: Any) -> Iterator[Callable[..., InferenceEngine]]:
    """Engines whose base `tiny` is a fresh copy of the tiny quantized model; shut down after the test."""
    engines = []

    def make(**config: Any) -> InferenceEngine:
        config = {"max_batch_size": 4, "max_seq_len": 128, **config}
        engine = InferenceEngine(
            EngineConfig(**config), load_base=lambda ref, device, dtype: (copy.deepcopy(tiny_base), tokenizer)
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()

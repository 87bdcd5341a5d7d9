"""The library runs from a copy of the repository with nothing beside it: no `../shared` datasets.

The tests and benchmarks read `../shared`; the package must not. The default OPTQ path (calibrated
on the C4 sample shipped in `modulora/calibration/`) runs in a subprocess whose `modulora` is the
copy's, in a folder whose parent has no `shared/`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.utils.tiny_lm import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
from pathlib import Path

import modulora
from modulora.models import load_model
from modulora.quant import QuantConfig
from modulora.quantize import quantize_model

assert Path(modulora.__file__).is_relative_to(Path.cwd()), modulora.__file__
assert not (Path.cwd().parent / "shared").exists()
config = QuantConfig(method="optq", bits=4, group_size=32)  # calibration: the shipped default
out = quantize_model(sys.argv[1], config, sys.argv[2], device="cpu")
model, _ = load_model(out)
print("bits", model.model.layers[0].self_attn.q_proj.bits)
"""


def test_default_optq_quantization_runs_from_a_copy_without_shared(tmp_path) -> None:
    copy = tmp_path / "checkout"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True, text=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    env = {**os.environ, "PYTHONPATH": str(copy), "MODULORA_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(tmp_path / "quantized")],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("bits 4")

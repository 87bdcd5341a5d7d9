"""The import contract in pyproject.toml ([tool.importlinter]) holds for the tree, and it catches a
lower layer importing a higher one, even inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT_PACKAGES = ("api", "worker", "core", "modulora", "gpu_kernels", "bench")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(executable), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_tree_keeps_the_import_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_lazy_import_of_the_service_from_the_library_breaks_it(tmp_path: Path) -> None:
    """The same contract over a tree of empty packages, where one library function imports core."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for package in ROOT_PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "core" / "config.py").write_text("")
    (tmp_path / "modulora" / "models.py").write_text("def load():\n    from core import config\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "1 kept, 1 broken" in result.stdout
    assert "modulora.models -> core.config" in result.stdout

"""Download Unsloth and what it needs beyond the GPU image, as wheels to carry to the device.

    python -m bench.unsloth_wheels DEST        # e.g. .dev/unsloth (git-ignored)

The device image has Python 3.12, torch 2.11 (cu130), Triton 3.6, transformers 5.17, PEFT 0.21,
accelerate, pandas, pyarrow, xxhash, httpx; nothing can be fetched there. Unsloth 2026.10.9's pins
admit that image (torch<2.15, transformers<=5.17.0, peft>=0.18, trl<=1.15.0, triton>=3.0); this
fetches the rest of what `import unsloth` and its QLoRA path load: unsloth_zoo, trl, datasets, tyro,
torchao, cut_cross_entropy, bitsandbytes and their small dependencies. xformers is left out (Unsloth
runs attention through SDPA without it) and so are diffusers and the Studio web app, which a
training step never imports.

Two wheels are trimmed to fit the carry limit: unsloth's drops `studio/` (82 MB of web app), and
bitsandbytes keeps only the CUDA 13 and CPU libraries (torch is cu130 there). Each rewritten wheel
gets a RECORD matching its files. On the device:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/unsloth/*.whl
    export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

WHEELS = [
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "bitsandbytes==0.50.2",
    "trl==1.15.0",
    "datasets==4.8.5",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "tyro==1.0.17",
    "docstring-parser==0.18.0",
    "typeguard==4.6.1",
    "shtab==1.13.0",
    "torchao==0.18.0",
    "cut_cross_entropy==25.1.1",
    "msgspec==0.23.0",
    "hf_transfer==0.1.9",
    "json5==0.17.3",
    "nest-asyncio==1.6.0",
    "structlog==26.1.0",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]


def download(dest: Path) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *WHEELS],
        check=True,
    )  # fmt: skip


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_wheel(wheel: Path, keep: Callable[[str], bool]) -> None:
    """Rewrite `wheel` in place with only the files `keep` accepts, and a RECORD listing them."""
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename == record_name or not keep(info.filename):
                continue
            data = src.read(info)
            dst.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        dst.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    trimmed.replace(wheel)


def _not_studio(name: str) -> bool:
    return not name.startswith("studio/")


def _cuda13_or_cpu(name: str) -> bool:
    library = name.rpartition("/")[2]
    if not library.startswith("libbitsandbytes_"):
        return True
    return library.startswith(("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    dest = parser.parse_args().dest
    dest.mkdir(parents=True, exist_ok=True)
    download(dest)
    trim_wheel(next(dest.glob("unsloth-*.whl")), _not_studio)
    trim_wheel(next(dest.glob("bitsandbytes-*.whl")), _cuda13_or_cpu)
    total = sum(path.stat().st_size for path in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

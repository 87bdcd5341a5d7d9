"""Quantizers and the storage formats they produce.

Every module in this package registers its formats and quantizers on import, and all of them are
imported here, so a new quantizer is one new file in this folder.
"""

import importlib
import pkgutil

from modulora.quant.base import (
    FORMATS,
    QUANTIZERS,
    QuantConfig,
    QuantizedLinear,
    Quantizer,
    register_format,
    register_quantizer,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_quantizer(config: QuantConfig) -> Quantizer:
    """The registered quantizer for `config.method`, configured."""
    if config.method not in QUANTIZERS:
        raise ValueError(f"method: unknown quantizer {config.method!r}; known: {sorted(QUANTIZERS)}")
    return QUANTIZERS[config.method](config)


__all__ = [
    "FORMATS",
    "QUANTIZERS",
    "QuantConfig",
    "QuantizedLinear",
    "Quantizer",
    "get_quantizer",
    "register_format",
    "register_quantizer",
]

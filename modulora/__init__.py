"""ModuLoRA: finetune LLMs with LoRA on 2/3/4-bit quantized weights, re-materialized layer by layer.

The package itself imports nothing heavy (the service reads `modulora.settings` without torch);
import the submodules: `modulora.quant`, `modulora.lora`, `modulora.models`, `modulora.train`, ...
"""

__version__ = "0.1.0"

"""ModuLoRA: finetune LLMs with LoRA on 2/3/4-bit quantized weights, re-materialized layer by layer."""

from modulora.lora import LoraConfig, LoraLinear, add_lora_
from modulora.quant import QuantConfig, QuantizedLinear, get_quantizer

__all__ = ["LoraConfig", "LoraLinear", "QuantConfig", "QuantizedLinear", "add_lora_", "get_quantizer"]
__version__ = "0.1.0"

"""4-bit (NF4 / FP4) frozen weights in bitsandbytes' own format, for QLoRA.

    QuantizedWeight        the format (packed uint8, per-block absmax, nested absmax, code tables)
    quantize               lora_kernels' quantiser (bytes equal to bitsandbytes' quantize_4bit)
    dequantize             the plain-PyTorch dequantiser (equal to bitsandbytes' dequantize_4bit)
    from_bnb               a QuantizedWeight sharing a bitsandbytes Params4bit's storage

bitsandbytes is optional: none of these import it.
"""
from .dequantize import dequantize
from .format import BLOCKSIZES, QUANT_TYPES, NestedAbsmax, QuantizedWeight, code_table, dynamic_code
from .from_bnb import from_bnb
from .quantize import quantize

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "NestedAbsmax", "QuantizedWeight", "code_table", "dequantize",
           "dynamic_code", "from_bnb", "quantize"]

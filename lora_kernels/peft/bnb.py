"""The converted PEFT QLoRA layer: PEFT's ``lora.bnb.Linear4bit`` with only ``forward`` replaced
(:func:`lora_kernels.qlora_layers._peft_fused_forward`: the 4-bit weight read through
:mod:`lora_kernels.qlora`).

A module-level class named like PEFT's, adding no state (as :mod:`.layers` does for the dense
layers), so ``pickle`` / ``torch.save`` / ``deepcopy`` of a converted model find it by import.
Imported only when a PEFT Linear4bit is converted (PEFT defines that class only when bitsandbytes is
installed).
"""
from __future__ import annotations

from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit

from ..qlora_layers import _peft_fused_forward


class Linear4bit(_PeftLinear4bit):
    """PEFT's lora.bnb.Linear4bit computing its forward with lora_kernels."""

    _lora_kernels_fused = True  # lora_kernels.peft.unconvert looks for this in the class dict
    forward = _peft_fused_forward


PEFT_CLASS = _PeftLinear4bit

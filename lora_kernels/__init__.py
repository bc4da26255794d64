"""lora_kernels: fused Triton kernels for LoRA fine-tuning, with a pure-PyTorch reference path.

Public API:
    lora_linear        functional LoRA linear (forward + backward, seeded in-kernel dropout)
    dora_linear        functional DoRA linear (PEFT's definition; norm without W + s·B·A)
    LoRALinear         nn.Module wrapping a frozen nn.Linear
    lora_linear_ref    the plain-PyTorch oracles (and dora_linear_ref)
    lora_scale         alpha/r or alpha/sqrt(r) (rsLoRA)
    BACKENDS           backend names accepted by ``backend=`` and $LORA_KERNELS_BACKEND
"""
from .backends import BACKENDS
from .functional import dora_linear, lora_linear
from .layers import LoRALinear, lora_scale
from .reference import dora_linear_ref, lora_linear_ref

__version__ = "0.1.0"

__all__ = ["BACKENDS", "LoRALinear", "dora_linear", "dora_linear_ref", "lora_linear", "lora_linear_ref", "lora_scale",
           "__version__"]

"""lora_kernels: fused Triton kernels for LoRA fine-tuning, with a pure-PyTorch reference path.

Public API:
    lora_linear        functional LoRA linear (forward + backward, seeded in-kernel dropout)
    dora_linear        functional DoRA linear (PEFT's definition; norm without W + s·B·A)
    LoRALinear         nn.Module wrapping a frozen nn.Linear / GPT-2 Conv1D (several named adapters)
    LoRAEmbedding      nn.Module wrapping a frozen nn.Embedding
    LoraConfig, inject, ...   whole models: inject, trainability, adapters, merge, save/load (PEFT format)
    lora_linear_ref    the plain-PyTorch oracles (and dora_linear_ref)
    QuantizedWeight    a 4-bit (NF4/FP4, bitsandbytes layout) frozen weight: pass it as ``weight`` (QLoRA);
                       lora_kernels.quant (quantise/dequantise), lora_kernels.qlora_layers (modules)
    lora_scale         alpha/r or alpha/sqrt(r) (rsLoRA)
    projection_groups  the shared-input projection groups (q/k/v, gate/up) inject/convert made, and
                       whether each applies (group_projections / ungroup_projections: by hand)
    BACKENDS           backend names accepted by ``backend=`` and $LORA_KERNELS_BACKEND
"""
from .backends import BACKENDS
from .functional import dora_linear, lora_linear
from .config import LoraConfig
from .layers import LoRAEmbedding, LoRALinear, lora_scale
from .model import (
    adapters_disabled,
    delete_adapter,
    inject,
    list_adapters,
    load_adapter,
    lora_state_dict,
    loraplus_param_groups,
    mark_only_lora_as_trainable,
    merge,
    merge_and_unload,
    safe_merge,
    save_adapter,
    set_adapter,
    unmerge,
)
from .reference import dora_linear_ref, lora_linear_ref
from .groups import group_projections, projection_groups, ungroup_projections
from .quant import QuantizedWeight
from . import qlora_layers  # noqa: E402  (QLoRA modules: QuantLinear, QLoRALinear, quantize_linears)
from . import peft  # noqa: E402  (lk.peft.convert; imports peft itself only when called)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "LoRAEmbedding", "LoRALinear", "LoraConfig", "QuantizedWeight", "adapters_disabled", "delete_adapter",
    "dora_linear",
    "dora_linear_ref", "group_projections", "inject", "list_adapters", "load_adapter", "lora_linear", "lora_linear_ref", "lora_scale",
    "lora_state_dict", "loraplus_param_groups", "mark_only_lora_as_trainable", "merge", "merge_and_unload",
    "projection_groups", "safe_merge", "save_adapter", "set_adapter", "ungroup_projections", "unmerge", "__version__",
]

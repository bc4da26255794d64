"""Several adapters on PEFT models converted by :func:`lora_kernels.peft.convert`.

PEFT hands a LoRA layer its per-row ``adapter_names`` as a forward keyword (PeftModel's forward and
generate install pre-hooks that add it) and keeps several active adapters in ``active_adapters``.
A converted layer routes both here (a short hook in peft.py's converted forward), and the layer's
own tensors go to :func:`lora_kernels.multi.multi_adapter_linear` — nothing is copied per call
(the stack is cached on the PEFT layer, rebuilt when a tensor's version changes).

Semantics are PEFT's: a name the layer lacks and ``"__base__"`` leave the row to the base layer;
several active adapters add up in ``active_adapters`` order (DoRA included). PEFT itself refuses
DoRA adapters in ``adapter_names`` before the layer is reached; that check stays PEFT's.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import multi_adapter_linear
from .store import AdapterSpec


def _dropout_p(module) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if isinstance(module, nn.Dropout):
        return float(module.p)
    raise TypeError(f"unsupported PEFT dropout module {type(module).__name__}")


def peft_layer_specs(module) -> list[AdapterSpec]:
    """AdapterSpecs for every adapter of a PEFT LoRA Linear, in ``lora_A`` order."""
    specs = []
    for name in module.lora_A.keys():
        a = module.lora_A[name].weight
        b = module.lora_B[name].weight
        mag = module.lora_magnitude_vector[name].weight if module.use_dora.get(name, False) else None
        specs.append(AdapterSpec(name, a, (lambda b=b: b), float(module.scaling[name]),
                                 _dropout_p(module.lora_dropout[name]), mag,
                                 tuple(t for t in (a, b, mag) if t is not None)))
    return specs


def peft_multi_forward(module, x: torch.Tensor, adapter_names=None) -> torch.Tensor:
    """A converted PEFT LoRA Linear's forward for ``adapter_names`` (one per batch row) or several
    active adapters."""
    base = module.base_layer
    if module.merged:
        raise ValueError("adapter_names / several active adapters cannot run while an adapter is merged; "
                         "unmerge first")
    if module.disable_adapters:
        return base(x)
    weight = base.weight.t() if module.fan_in_fan_out else base.weight
    specs = peft_layer_specs(module)
    index = {s.name: i for i, s in enumerate(specs)}
    x_cast = x.to(weight.dtype) if x.dtype != weight.dtype else x
    if adapter_names is not None:
        batch = x.shape[0] if x.dim() > 1 else 1
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries; it needs one per batch row ({batch})")
        per_item = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64)
        rows = per_item.repeat_interleave(x_cast[..., 0].numel() // max(batch, 1)).to(x.device)
        y = multi_adapter_linear(x_cast, weight, base.bias, specs, row_adapter=rows, training=module.training,
                                 owner=module, weight_param=base.weight)
    else:
        active = [index[n] for n in module.active_adapters if n in index]
        y = multi_adapter_linear(x_cast, weight, base.bias, specs, active=active, training=module.training,
                                 owner=module, weight_param=base.weight)
    return y.to(x.dtype) if y.dtype != x.dtype else y

"""Interoperability with Hugging Face PEFT: run a PeftModel's LoRA/DoRA layers on our kernels.

``convert(peft_model)`` swaps, in place, the class of every PEFT LoRA ``Linear`` (nn.Linear or
GPT-2 Conv1D base, LoRA or DoRA) for a subclass whose forward calls :func:`lora_kernels.lora_linear`
/ :func:`lora_kernels.dora_linear` with the layer's own tensors. Parameters, module structure and
state-dict keys are untouched, so PEFT's ``save_pretrained``, adapters, merging and everything else
keep working, and the optimizer's parameters stay the same objects.

What the fused forward covers: one active adapter, no mixed-adapter batches (``adapter_names=``),
no other PEFT variants (aLoRA, VeRA-style ...). PEFT's 4-bit ``lora.bnb.Linear4bit`` layers (QLoRA) are
converted by :mod:`lora_kernels.qlora_layers` (bitsandbytes' weight read in place). Anything else falls back to
PEFT's own forward — visibly: ``convert`` returns the names it converted and skips (with the reason)
what it cannot handle, and a converted layer that meets an unsupported call raises instead of
silently taking PEFT's slow path.

PEFT's dropout module: with p > 0 we draw our own seeded mask (nn.Dropout's mask is not
reproducible across backends), so results equal PEFT's in distribution, not bit for bit; the tests
substitute our seeded mask on the PEFT side to compare exactly.
"""
from __future__ import annotations

from torch import nn

from . import qlora_layers as _qlora_layers
from .functional import dora_linear, lora_linear

_FUSED_CLASSES: dict[type, type] = {}


def _dropout_p(module) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if isinstance(module, nn.Dropout):
        return float(module.p)
    raise TypeError(f"unsupported PEFT dropout module {type(module).__name__}")


def _fused_forward(self, x, *args, **kwargs):
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None or (len(self.active_adapters) > 1 and not self.disable_adapters):
        from .multi.peft_glue import peft_multi_forward  # mixed batches / several active adapters
        return peft_multi_forward(self, x, adapter_names)
    if args or kwargs:
        raise NotImplementedError(f"lora_kernels-converted PEFT layer: extra forward arguments {list(kwargs)} "
                                  "(e.g. mixed-adapter batches) are not supported")
    if self.disable_adapters or self.merged or not self.active_adapters:
        return self.base_layer(x)
    if len(self.active_adapters) != 1:
        raise NotImplementedError(f"lora_kernels-converted PEFT layer: {len(self.active_adapters)} active "
                                  "adapters; one is supported")
    name = self.active_adapters[0]
    base = self.base_layer
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    a = self.lora_A[name].weight
    b = self.lora_B[name].weight
    scale = self.scaling[name]
    p = _dropout_p(self.lora_dropout[name])
    x_cast = x.to(weight.dtype) if x.dtype != weight.dtype else x
    if self.use_dora.get(name, False):
        mag = self.lora_magnitude_vector[name].weight
        y = dora_linear(x_cast, weight, a, b, mag, scale, bias=base.bias, dropout_p=p, training=self.training)
    else:
        y = lora_linear(x_cast, weight, a, b, scale, bias=base.bias, dropout_p=p, training=self.training)
    return y.to(x.dtype) if y.dtype != x.dtype else y


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward,
                                                                     "_lora_kernels_fused": True})
    return _FUSED_CLASSES[cls]


def _supported(module) -> str | None:
    """None if ``module`` can run on our kernels, else why not."""
    from .layers import is_conv1d

    base = module.base_layer
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        return f"base layer {type(base).__name__} (quantized or not linear)"
    names = list(module.lora_A.keys())
    for name in names:
        if name in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False):
            return f"PEFT variant {type(module.lora_variant[name]).__name__}"
        if getattr(module, "lora_bias", {}).get(name, False):
            return "lora_bias=True"
        try:
            _dropout_p(module.lora_dropout[name])
        except TypeError as exc:
            return str(exc)
    return None


def convert(peft_model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Make every PEFT LoRA/DoRA Linear of ``peft_model`` compute with lora_kernels, in place.

    Returns (converted module names, {skipped module name: reason}).
    """
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError as exc:  # pragma: no cover - peft is in the test extra
        raise ImportError("lora_kernels.peft.convert needs peft installed") from exc
    converted, skipped = [], {}
    for name, module in peft_model.named_modules():
        if _qlora_layers.is_peft_linear4bit(module) and not getattr(module, "_lora_kernels_fused", False):
            _qlora_layers.convert_peft_linear4bit(module, name, converted, skipped)  # QLoRA (issue 17)
            continue
        if not isinstance(module, PeftLinear) or getattr(module, "_lora_kernels_fused", False):
            continue
        reason = _supported(module)
        if reason is not None:
            skipped[name] = reason
            continue
        module.__class__ = _fused_class(type(module))
        converted.append(name)
    if not converted and not skipped:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA Linear layer to convert")
    return converted, skipped


def unconvert(peft_model: nn.Module) -> None:
    """Undo :func:`convert` (PEFT's own forward again)."""
    for module in peft_model.modules():
        if getattr(type(module), "_lora_kernels_fused", False):
            module.__class__ = type(module).__mro__[1]


__all__ = ["convert", "unconvert"]

"""``convert`` / ``unconvert``: switch PEFT LoRA layers to the forward of :mod:`.layers` and back."""
from __future__ import annotations

import warnings

from torch import nn

# Why each PEFT LoRA layer kind that is not converted is left to PEFT (docs/models.md has the table).
_NOT_CONVERTED = {
    "Conv1d": "a convolution, not a GEMM on the input: a fused path needs the patches unfolded (kernel-size "
              "times the input's memory), so PEFT's forward is kept",
    "Conv2d": None,  # same reason, filled below
    "Conv3d": None,
    "MultiheadAttention": "PEFT merges the adapter into in_proj_weight for every forward; there is no separate "
                          "LoRA product to fuse, so PEFT's forward is kept",
    "ParamWrapper": "LoRA on an nn.Parameter (target_parameters) is a weight parametrization; there is no LoRA "
                    "product to fuse, so PEFT's forward is kept",
}
for _kind in ("Conv2d", "Conv3d"):
    _NOT_CONVERTED[_kind] = _NOT_CONVERTED["Conv1d"]


def _peft():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is in the test extra
        raise ImportError("lora_kernels.peft.convert needs peft installed (pip install peft)") from exc
    from . import layers

    return LoraLayer, layers


def _kind_reason(module) -> str:
    name = type(module).__name__
    if name in _NOT_CONVERTED:
        return f"PEFT LoRA {name}: {_NOT_CONVERTED[name]}"
    return (f"PEFT layer class {type(module).__module__}.{type(module).__qualname__}: no lora_kernels forward for it "
            "(another tuner's layer, or a quantized or backend-specific base), PEFT's forward is kept")


def convert(peft_model: nn.Module, group_projections: bool = True) -> tuple[list[str], dict[str, str]]:
    """Make every PEFT LoRA/DoRA Linear and LoRA Embedding of ``peft_model`` compute with lora_kernels, in place.

    Returns (names of the layers that now run on lora_kernels, {name: reason} for every other PEFT LoRA
    layer). Calling it again after adding adapters converts the new layers and hands back to PEFT any
    converted layer whose adapters are no longer supported (listed in ``skipped``). A model without any
    PEFT LoRA layer gives ([], {}) and a warning.

    ``group_projections``: then group the converted q/k/v and gate/up layers of known Llama-style
    attention / MLP classes into shared-input projection groups (lora_kernels.groups;
    docs/projection-groups.md); False adds none (groups already made stay, except those with a member
    handed back to PEFT here, which are dissolved).
    """
    if not isinstance(group_projections, bool):
        raise TypeError(f"group_projections must be a bool, got {group_projections!r}")
    LoraLayer, layers = _peft()
    ours = tuple(layers.CONVERTED.values())
    converted, skipped = [], {}
    mha = tuple(f"{n}." for n, m in peft_model.named_modules() if type(m).__name__ == "MultiheadAttention"
                and isinstance(m, LoraLayer))
    from .. import qlora_layers

    for name, module in peft_model.named_modules():
        if qlora_layers.is_peft_linear4bit(module):  # PEFT's lora.bnb.Linear4bit (QLoRA, issue 17)
            if not getattr(module, "_lora_kernels_fused", False):
                qlora_layers.convert_peft_linear4bit(module, name, converted, skipped)
            else:
                converted.append(name)
            continue
        if not isinstance(module, LoraLayer):
            continue
        if mha and name.startswith(mha):
            if isinstance(module, ours):
                module.__class__ = type(module).__mro__[1]
            skipped[name] = ("out_proj of a LoRA MultiheadAttention: nn.MultiheadAttention reads its weight "
                             "directly (PEFT merges the adapter for each forward), so PEFT's layer is kept")
            continue
        if isinstance(module, ours):
            peft_cls = type(module).__mro__[1]
        elif type(module) in layers.CONVERTED:
            peft_cls = type(module)
        else:
            skipped[name] = _kind_reason(module)
            continue
        reason = layers.layer_reason(module)
        if reason is not None:
            module.__class__ = peft_cls  # (back) to PEFT's forward
            skipped[name] = reason
            continue
        module.__class__ = layers.CONVERTED[peft_cls]
        converted.append(name)
    if not converted:
        what = f"{len(skipped)} PEFT LoRA layers, none convertible" if skipped else "no PEFT LoRA layer"
        warnings.warn(f"lora_kernels.peft.convert: {type(peft_model).__name__} has {what}; nothing was converted",
                      stacklevel=2)
    from ..groups import _apply
    # add groups (or, opted out, only dissolve those whose members were handed back to PEFT above)
    _apply(peft_model, (), known_only=True, add=group_projections)
    return converted, skipped


def unconvert(peft_model: nn.Module) -> None:
    """Undo :func:`convert` (PEFT's own forward again)."""
    _, layers = _peft()
    ours = tuple(layers.CONVERTED.values())
    from ..groups import ungroup_projections
    ungroup_projections(peft_model)  # PEFT's forward knows no group
    for module in peft_model.modules():
        if isinstance(module, ours) or "_lora_kernels_fused" in type(module).__dict__:  # dense, or QLoRA's
            module.__class__ = type(module).__mro__[1]

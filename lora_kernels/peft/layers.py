"""Converted PEFT LoRA layers: PEFT's classes with only ``forward`` replaced.

The classes are module-level subclasses named like PEFT's (so ``repr`` still reads
``lora.Linear(...)`` and ``pickle``/``torch.save``/``deepcopy`` find them by import), adding no
state: :func:`lora_kernels.peft.convert` switches a layer's ``__class__`` to one of them and
``unconvert`` switches it back.

Forward, in PEFT's order of precedence (peft/tuners/lora/layer.py, ``Linear.forward``):
1. PEFT's own argument checks (``_check_forward_args``: its ValueErrors for bad ``adapter_names``);
2. adapters disabled: a merged layer is unmerged first (as PEFT does), then the base layer;
3. ``adapter_names=`` mixed batches: Linear layers run them on lora_kernels.multi (one segmented
   shrink and expand per layer); Embedding layers run PEFT's own mixed-batch lookup (gathers per
   adapter: there is no product to fuse);
4. merged: the base layer (the adapter is in its weight);
5. the active adapters this layer has (others are skipped, as PEFT does): none → the base layer;
   one → our kernels; several → lora_kernels.multi for Linear layers (PEFT's sum, in
   ``active_adapters`` order), NotImplementedError for Embedding layers.
"""
from __future__ import annotations

import numbers

import torch
from peft.tuners import lora as peft_lora
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.variants import DoraEmbeddingVariant, DoraLinearVariant
from torch import nn

from ..dora import dora_weight_norm_torch
from ..functional import _AUTOCAST_DEVICE_TYPES, dora_linear, lora_linear
from ..layers import _compiling, is_conv1d

_HOW_TO_UNDO = "lora_kernels.peft.unconvert(model) gives the model PEFT's forward back"


def dropout_p(module: nn.Module) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    raise TypeError(f"unsupported PEFT dropout module {type(module).__name__}")


def _adapter_reason(layer, name: str) -> str | None:
    """None if adapter ``name`` of a PEFT lora.Linear/Embedding can run on our path, else why not."""
    variant = layer.lora_variant.get(name)
    is_dora = isinstance(variant, (DoraLinearVariant, DoraEmbeddingVariant))
    if variant is not None and not is_dora:
        return f"PEFT LoRA variant {type(variant).__name__} (only plain LoRA and DoRA are converted)"
    if isinstance(layer, peft_lora.Embedding):
        if layer.input_fns.get(name) is not None or layer.output_fns.get(name) is not None:
            return "tensor-parallel Embedding (PEFT's input/output hooks)"
        return None
    if is_dora and layer.lora_bias.get(name, False):
        return "DoRA with lora_bias=True (PEFT folds lora_B's bias into the DoRA norm; not implemented here)"
    try:
        dropout_p(layer.lora_dropout[name])
    except TypeError as exc:
        return str(exc)
    return None


def layer_reason(layer) -> str | None:
    """None if every adapter of ``layer`` (a PEFT lora.Linear or lora.Embedding) can run on our path."""
    base = layer.get_base_layer()
    if isinstance(layer, peft_lora.Embedding):
        if not isinstance(base, nn.Embedding):
            return f"Embedding LoRA layer with a {type(base).__name__} base (not nn.Embedding)"
        if getattr(layer, "tp_layer", None) is not None:
            return "tensor-parallel Embedding (PEFT's input/output hooks)"
        names = list(layer.lora_embedding_A.keys())
    else:
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            return f"base layer {type(base).__name__} (not nn.Linear or Conv1D)"
        names = list(layer.lora_A.keys())
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return f"base weight of type {type(weight).__name__} (quantized or not a floating tensor)"
    for name in names:
        reason = _adapter_reason(layer, name)
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    return None


_SEVERAL = "several"  # _active's answer for several active adapters (Linear layers: lora_kernels.multi)


def _active(layer, adapters) -> str | None:
    """The one active adapter ``layer`` has (None: run the base layer); several: ``_SEVERAL`` for a
    Linear layer (routed to lora_kernels.multi), refused for an Embedding."""
    active = [name for name in layer.active_adapters if name in adapters]
    if len(active) > 1 and isinstance(layer, peft_lora.Linear):
        for name in active:
            reason = _adapter_reason(layer, name)
            if reason is not None:
                raise NotImplementedError(
                    f"lora_kernels-converted PEFT layer: active adapter {name!r} uses {reason}; call "
                    f"lora_kernels.peft.convert(model) again (it hands such layers back to PEFT), or: {_HOW_TO_UNDO}")
        return _SEVERAL
    if len(active) > 1:
        raise NotImplementedError(
            f"lora_kernels-converted PEFT layer: several active adapters at once ({active}) are not supported "
            f"yet; activate one with set_adapter(name), or: {_HOW_TO_UNDO}")
    if not active:
        return None
    reason = _adapter_reason(layer, active[0])
    if reason is not None:
        raise NotImplementedError(
            f"lora_kernels-converted PEFT layer: active adapter {active[0]!r} uses {reason}; it was added after "
            f"convert(): call lora_kernels.peft.convert(model) again (it hands such layers back to PEFT), or: "
            f"{_HOW_TO_UNDO}")
    return active[0]


def _peft_preamble(layer, x, args, kwargs):
    """Steps 1-4 of the module docstring: (adapter name or None, base output or None)."""
    layer._check_forward_args(x, *args, **kwargs)
    adapter_names = kwargs.pop("adapter_names", None)
    for key in VARIANT_KWARG_KEYS:  # only PEFT's variants (aLoRA) read these; never passed to the base layer
        kwargs.pop(key, None)
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()
        return None, layer.base_layer(x, *args, **kwargs)
    if adapter_names is not None and isinstance(layer, peft_lora.Linear):
        if args or kwargs:
            raise NotImplementedError(f"lora_kernels-converted PEFT layer: extra forward arguments "
                                      f"({len(args)} positional, keywords {sorted(kwargs)}) are not supported")
        from ..multi.peft_glue import peft_multi_forward  # mixed batches: one shrink + one expand launch

        return None, peft_multi_forward(layer, x, adapter_names)
    if adapter_names is not None:  # an Embedding: PEFT's own mixed-batch lookup (gathers, no product to fuse)
        return None, peft_lora.Embedding._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
    if layer.merged:
        return None, layer.base_layer(x, *args, **kwargs)
    adapters = layer.lora_embedding_A if isinstance(layer, peft_lora.Embedding) else layer.lora_A
    name = _active(layer, adapters)
    if name is None:
        return None, layer.base_layer(x, *args, **kwargs)
    if args or kwargs:
        raise NotImplementedError(f"lora_kernels-converted PEFT layer: extra forward arguments "
                                  f"({len(args)} positional, keywords {sorted(kwargs)}) are not supported")
    if name is _SEVERAL:
        from ..multi.peft_glue import peft_multi_forward  # several active adapters, summed as PEFT does

        return None, peft_multi_forward(layer, x)
    return name, None


def _scale_args(scale, lora_b):
    """(lora_b, scale) for the ops: a tensor ``scale`` (PEFT's prepare_model_for_compiled_hotswap) is
    folded into B — s·u·Bᵀ = u·(s·B)ᵀ — so the op sees 1.0 and a compiled graph neither breaks nor
    recompiles when the scale's value changes."""
    if isinstance(scale, torch.Tensor):
        return lora_b * scale.to(device=lora_b.device, dtype=lora_b.dtype), 1.0
    if isinstance(scale, numbers.Real):
        return lora_b, scale
    raise TypeError(f"PEFT scaling must be a real number or a tensor, got {type(scale).__name__}")


def _autocast_on(x: torch.Tensor) -> bool:
    # the device types with autocast, asked once at import (torch 2.11's dynamo cannot trace
    # torch.amp.is_autocast_available; lora_kernels.functional has the same set)
    t = x.device.type
    return t in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(t)


class Linear(peft_lora.Linear):
    """PEFT's lora.Linear computing its forward with lora_kernels (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group = self.__dict__.get("_lk_group")  # lora_kernels.groups
        if group is not None:
            y = (group[0].traced_output(group[1], x, args, kwargs) if _compiling()
                 else group[0].output(group[1], x, args, kwargs))
            if y is not None:
                return y
        name, result = _peft_preamble(self, x, args, kwargs)
        if name is None:
            return result
        base = self.get_base_layer()
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        lora_b, scale = _scale_args(self.scaling[name], self.lora_B[name].weight)
        a = self.lora_A[name].weight
        p = dropout_p(self.lora_dropout[name])
        if not _autocast_on(x) and x.dtype != weight.dtype:
            x = x.to(weight.dtype)  # as the base layer's dtype; PEFT casts x for the adapter path
        if self.lora_variant.get(name) is not None:  # DoRA (other variants are never converted)
            mag = self.lora_magnitude_vector[name].weight
            return dora_linear(x, weight, a, lora_b, mag, scale, bias=base.bias, dropout_p=p, training=self.training)
        bias = base.bias
        if self.lora_bias.get(name, False):  # y = ... + s·(u·Bᵀ + b_B): fold s·b_B into the bias
            extra = self.lora_B[name].bias * self.scaling[name]
            bias = extra if bias is None else bias + extra.to(bias.dtype)
        return lora_linear(x, weight, a, lora_b, scale, bias=bias, dropout_p=p, training=self.training)


class Embedding(peft_lora.Embedding):
    """PEFT's lora.Embedding: base lookup, then the gather of Aᵀ's rows (M × r) and one rank-r
    expand accumulated into the base output in place of a separate M × dim product and sum.

    DoRA (PEFT's DoraEmbeddingVariant): y = c ⊙ (E[ids] + s·Aᵀ[ids]·Bᵀ), c = m / n with n_j the norm,
    over the vocabulary, of column j of E + s·(B·A)ᵀ — streamed (lora_kernels.dora, never vocab × dim
    at once), fp32, detached as in PEFT. An embed_scale (Gemma-style embeddings) multiplies the
    adapter term, not the norm, as in PEFT."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name, result = _peft_preamble(self, x, args, kwargs)
        if name is None:
            return result
        result = self.base_layer(x)
        a = self.lora_embedding_A[name]  # r × num_embeddings
        b = self.lora_embedding_B[name]  # dim × r
        lora_b, scale = _scale_args(self.scaling[name], b)
        factor = None
        if self.lora_variant.get(name) is not None:  # DoRA (other variants are never converted)
            norm = dora_weight_norm_torch(self.get_base_layer().weight.t(), a, lora_b, scale)
            factor = self.lora_magnitude_vector[name].weight / norm
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            lora_b = lora_b * embed_scale.to(device=lora_b.device, dtype=lora_b.dtype)
        gathered = self._embed(x, a.t())  # (..., r): rows of Aᵀ picked by the ids
        dim = result.shape[-1]
        out = torch.addmm(result.reshape(-1, dim), gathered.reshape(-1, gathered.shape[-1]).to(result.dtype),
                          lora_b.t().to(result.dtype), alpha=scale)
        if factor is not None:
            out = out * factor.to(out.dtype)
        return out.reshape(result.shape)


CONVERTED = {peft_lora.Linear: Linear, peft_lora.Embedding: Embedding}

"""QLoRA modules: a frozen 4-bit linear layer (:class:`QuantLinear`), a LoRA/DoRA layer on a 4-bit
base (:class:`QLoRALinear`, base = QuantLinear or a bitsandbytes ``Linear4bit``), quantising a
model's Linear layers, and the conversion of PEFT's ``lora.bnb.Linear4bit`` layers.

Model-level entry points: ``lk.inject(model, config, quantize="nf4")`` (quantises the targets, then
adapts them) and ``lk.inject(model_with_bnb_Linear4bit_layers, config)`` (adapts them as they are).
``quantize_linears(model)`` quantises every other Linear too.

Merging into a 4-bit base (``merge`` / ``lk.merge_and_unload``), as PEFT does: dequantise to fp32,
add s·B·A (DoRA: scale the rows by m/n), quantise again with the same type, blocksize and nesting.
The merged weight is therefore rounded to 4 bits again: the merged layer differs from base + adapter
by up to half a code step times the block absmax per weight (``merge`` warns with the measured
largest change). ``unmerge`` restores the original 4-bit weight exactly (its bytes are kept).
For an exact merge use :func:`merge_and_dequantize` (dense layers in a float dtype).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import qlora
from .dora import dora_weight_norm_torch
from .layers import INITS, LoraAdapter, LoRALinear, is_conv1d
from .quant.format import NestedAbsmax, QuantizedWeight
from .quant.from_bnb import from_bnb, is_bnb_linear4bit, to_bnb_quant_state
from .quant.quantize import quantize

_QUANT_BUFFERS = ("weight_packed", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                  "weight_nested_offset")


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is 4-bit (bitsandbytes' format, no bitsandbytes needed).

    y = x·deq(Q)ᵀ + b, computed in x's dtype; the dequantised weight lives only in a scratch buffer
    (also in backward, where dx = g·deq(Q)). The 4-bit state is kept as buffers (state_dict keys
    ``weight_packed``, ``weight_absmax``, ``weight_code`` and, nested, ``weight_nested_*``); moving
    the module to another dtype leaves them alone (only the bias is cast).
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, backend: str | None = None):
        super().__init__()
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        qlora.prepare_for_compile()  # so torch.compile(fullgraph=True) names qlora.COMPILE_REASON
        self.backend = backend
        self._set_qweight(qweight)
        if bias is not None:
            if bias.shape != (qweight.shape[0],):
                raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_qweight(self, qw: QuantizedWeight) -> None:
        self.out_features, self.in_features = qw.shape
        self.quant_type, self.blocksize, self.compute_dtype = qw.quant_type, qw.blocksize, qw.dtype
        self.nested_blocksize = qw.nested.blocksize if qw.nested is not None else None
        for name in _QUANT_BUFFERS:
            self._buffers.pop(name, None)
        self.register_buffer("weight_packed", qw.packed.reshape(-1))
        self.register_buffer("weight_absmax", qw.absmax)
        self.register_buffer("weight_code", qw.code)
        if qw.nested is not None:
            self.register_buffer("weight_nested_absmax", qw.nested.absmax)
            self.register_buffer("weight_nested_code", qw.nested.code)
            self.register_buffer("weight_nested_offset", qw.nested.offset)

    @property
    def weight(self) -> QuantizedWeight:
        nested = None
        if self.nested_blocksize is not None:
            nested = NestedAbsmax(self.weight_nested_absmax, self.weight_nested_code, self.nested_blocksize,
                                  self.weight_nested_offset)
        return QuantizedWeight(self.weight_packed, self.weight_absmax, (self.out_features, self.in_features),
                               self.quant_type, self.blocksize, self.weight_code, self.compute_dtype, nested)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not cast the 4-bit statistics: move them, keep their dtype.
        saved = {k: self._buffers.pop(k) for k in _QUANT_BUFFERS if k in self._buffers}
        super()._apply(fn, recurse)
        for k, t in saved.items():
            moved = fn(t)
            self._buffers[k] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora.linear(x, self.weight, self.bias, backend=self.backend)

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, dtype: torch.dtype | None = None,
                    backend: str | None = None) -> "QuantLinear":
        """Quantise an ``nn.Linear`` (or GPT-2 ``Conv1D``, whose (in, out) weight is transposed first).
        Defaults are bitsandbytes' QLoRA defaults (NF4, blocksize 64, nested statistics)."""
        if is_conv1d(linear):
            w = linear.weight.detach().t()
        elif isinstance(linear, nn.Linear):
            w = linear.weight.detach()
        else:
            raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        qw = quantize(w, quant_type, blocksize, compress_statistics, dtype=dtype)
        return cls(qw, linear.bias, backend=backend)

    @classmethod
    def from_bnb(cls, layer: nn.Module, backend: str | None = None) -> "QuantLinear":
        """From a bitsandbytes ``Linear4bit`` (its 4-bit tensors shared, not copied)."""
        if not is_bnb_linear4bit(layer):
            raise TypeError(f"expected a bitsandbytes Linear4bit, got {type(layer).__name__}")
        return cls(from_bnb(layer.weight), layer.bias, backend=backend)

    def to_bnb(self) -> nn.Module:
        """A bitsandbytes ``Linear4bit`` holding the same 4-bit bytes (needs bitsandbytes)."""
        import bitsandbytes as bnb

        qw = self.weight
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=qw.nested is not None,
                                  quant_type=qw.quant_type, device="meta")
        _set_bnb_weight(layer, qw)
        _keep_bnb_layout(layer)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        nested = ", nested" if self.nested_blocksize is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, blocksize={self.blocksize}{nested}")


def _set_bnb_weight(layer: nn.Module, qw: QuantizedWeight) -> None:
    import bitsandbytes as bnb

    state = to_bnb_quant_state(qw)
    layer.weight = bnb.nn.Params4bit(qw.packed.reshape(-1, 1), requires_grad=False, quant_state=state,
                                     blocksize=qw.blocksize, compress_statistics=qw.nested is not None,
                                     quant_type=qw.quant_type, quant_storage=torch.uint8, bnb_quantized=True,
                                     module=layer)
    layer.quant_state = state


def _keep_bnb_layout(layer: nn.Module) -> None:
    """bitsandbytes repacks a Linear4bit's bytes for its CPU kernel on the first eval forward without
    grad (machines with AVX512-BF16); lora_kernels reads the standard layout, so that is switched off."""
    if is_bnb_linear4bit(layer) and hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def is_quantized_linear(module: nn.Module) -> bool:
    """A 4-bit linear base: lora_kernels' QuantLinear or a bitsandbytes Linear4bit."""
    return isinstance(module, QuantLinear) or is_bnb_linear4bit(module)


def quantized_weight_of(base: nn.Module) -> QuantizedWeight:
    return base.weight if isinstance(base, QuantLinear) else from_bnb(base.weight)


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a 4-bit base (bitsandbytes' weight shape is the packed one)."""
    return base.in_features, base.out_features


class QLoRALinear(LoRALinear):
    """LoRA / DoRA adapters on a frozen 4-bit base (a :class:`QuantLinear` or a bitsandbytes ``Linear4bit``).

    The forward runs :func:`lora_kernels.lora_linear` (or ``dora_linear``) with the base's
    :class:`QuantizedWeight`; everything else (several adapters, set/delete, save/load in PEFT's
    format) is :class:`lora_kernels.LoRALinear`'s. Adapters are created in the base's compute dtype.
    Not supported on a 4-bit base: PiSSA (it rewrites the frozen weight) and ``enable_lora`` slices.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                 use_dora: bool = False, adapter_name: str = "default", enable_lora: list[bool] | None = None):
        nn.Module.__init__(self)
        if not is_quantized_linear(base_layer):
            raise TypeError(f"base_layer must be a lora_kernels QuantLinear or a bitsandbytes Linear4bit, got "
                            f"{type(base_layer).__name__}")
        qlora.prepare_for_compile()  # so torch.compile(fullgraph=True) names qlora.COMPILE_REASON
        self.base_layer = base_layer
        self.fan_in_fan_out = False
        _keep_bnb_layout(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._init_host(backend)
        self.register_buffer("_merged_dora_scale", None, persistent=False)
        self._premerge_weight: QuantizedWeight | None = None
        self.add_adapter(adapter_name, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                         use_dora=use_dora, enable_lora=enable_lora)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", use_dora: bool = False, enable_lora: list[bool] | None = None) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not supported on a 4-bit base (PiSSA would rewrite the frozen "
                             f"weight); use one of {INITS}")
        if enable_lora is not None:
            raise ValueError("enable_lora (per-slice adapters) is not supported on a 4-bit base")
        qw = self.weight
        adapter = LoraAdapter(self.in_features, self.out_features, rank, alpha, dropout, use_rslora, use_dora,
                              None, dtype=qw.dtype, device=qw.device)
        adapter.reset_parameters(init)
        self.adapters[name] = adapter
        if use_dora:
            adapter.lora_magnitude = nn.Parameter(self._dora_norm(adapter).to(qw.dtype))
        if self.active_adapter is None:
            self.active_adapter = name

    @property
    def weight(self) -> QuantizedWeight:
        """The frozen 4-bit weight (a QuantizedWeight sharing the base's tensors)."""
        return quantized_weight_of(self.base_layer)

    @property
    def in_features(self) -> int:
        return in_out_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return in_out_features(self.base_layer)[1]

    def _dora_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        w = self.weight.dequantize(torch.float32)  # an fp32 N×K transient (init / merge only)
        return dora_weight_norm_torch(w, adapter.lora_A, adapter.full_b(), adapter.scale)

    def _compute_dtype(self, x):
        dtype = getattr(self.base_layer, "compute_dtype", None)
        return dtype if is_bnb_linear4bit(self.base_layer) and dtype is not None else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            raise RuntimeError("adapters are disabled but one is merged into the weight; unmerge() first")
        if self.merged or self.disabled or self.active_adapter is None:
            return self.base_layer(x)
        a = self.active
        dtype = self._compute_dtype(x)
        xc = x.to(dtype) if x.dtype != dtype else x
        if a.use_dora:
            y = qlora.dora_linear(xc, self.weight, a.lora_A, a.lora_B, a.lora_magnitude, a.scale, bias=self.bias,
                                  dropout_p=a.dropout, training=self.training, backend=self.backend)
        else:
            y = qlora.lora_linear(xc, self.weight, a.lora_A, a.lora_B, a.scale, bias=self.bias, dropout_p=a.dropout,
                                  training=self.training, backend=self.backend)
        return y.to(x.dtype) if y.dtype != x.dtype else y

    def _set_weight(self, qw: QuantizedWeight) -> None:
        if isinstance(self.base_layer, QuantLinear):
            self.base_layer._set_qweight(qw)
        else:
            _set_bnb_weight(self.base_layer, qw)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Dequantise, add the adapter (fp32), re-quantise (same type, blocksize, nesting): see the
        module docstring for the rounding. Warns with the largest change the re-quantisation made."""
        if self.merged:
            raise RuntimeError(f"QLoRALinear.merge(): adapter {self.merged_adapter!r} is already merged; "
                               "call unmerge() first")
        a = self.active
        qw = self.weight
        merged = qw.dequantize(torch.float32) + a.delta_weight()
        c = None
        if a.use_dora:
            c = a.lora_magnitude.detach().float() / self._dora_norm(a).float()
            if not torch.all(torch.isfinite(c)) or torch.any(c == 0):
                raise RuntimeError("QLoRALinear.merge(): the DoRA scale m/n has zero or non-finite entries")
            merged.mul_(c[:, None])
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {self.active_adapter!r} would put NaN/inf into the weight; "
                             "nothing was written")
        new = quantize(merged, qw.quant_type, qw.blocksize, compress_statistics=qw.nested is not None, dtype=qw.dtype)
        change = (new.dequantize(torch.float32) - merged).abs().max().item()
        self._premerge_weight = QuantizedWeight(qw.packed.clone(), qw.absmax.clone(), qw.shape, qw.quant_type,
                                                qw.blocksize, qw.code.clone(), qw.dtype, _clone_nested(qw.nested))
        self._set_weight(new)
        self._merged_dora_scale = c
        self.merged_adapter = self.active_adapter
        self.merge_rounding = change
        warnings.warn(f"merged adapter {self.active_adapter!r} into a 4-bit weight: W + s·B·A was re-quantised "
                      f"to {qw.quant_type} (blocksize {qw.blocksize}), changing weights by up to {change:.3g}; "
                      "unmerge() restores the original 4-bit weight exactly. For an exact merge use "
                      "lora_kernels.qlora_layers.merge_and_dequantize", UserWarning, stacklevel=2)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the 4-bit weight saved by ``merge`` (exact: the original bytes)."""
        if not self.merged:
            raise RuntimeError("QLoRALinear.unmerge(): the adapter is not merged")
        self._set_weight(self._premerge_weight)
        self._premerge_weight = None
        self._merged_dora_scale = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        qw = self.weight
        return f"4-bit {qw.quant_type}({self.in_features}→{self.out_features}), " + super(LoRALinear, self).extra_repr()


def _clone_nested(nested):
    if nested is None:
        return None
    return NestedAbsmax(nested.absmax.clone(), nested.code.clone(), nested.blocksize, nested.offset.clone())


# ------------------------------------------------------------------------------------------------
# models


def quantize_modules(model: nn.Module, names, quant_type: str = "nf4", blocksize: int = 64,
                     compress_statistics: bool = True) -> list[str]:
    """Replace the named Linear / Conv1D modules of ``model`` by :class:`QuantLinear` (in place);
    modules that already are 4-bit, and embeddings, are left as they are. Everything is checked
    before anything is replaced. Returns the names quantised."""
    from .layers import LORA_LAYERS

    from .quant.format import BLOCKSIZES, QUANT_TYPES

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize / quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    todo = []
    for name in names:  # check everything before changing anything
        module = model.get_submodule(name)
        if isinstance(module, LORA_LAYERS):
            if is_quantized_linear(module.base_layer):
                continue
            raise ValueError(f"module {name!r} already carries adapters on a dense weight; quantise before injecting")
        if is_quantized_linear(module) or isinstance(module, nn.Embedding):
            continue  # already 4-bit; embeddings stay dense
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(f"module {name!r} is a {type(module).__name__}; only Linear / Conv1D layers are quantised")
        todo.append((name, module))
    for name, module in todo:
        new = QuantLinear.from_linear(module, quant_type, blocksize, compress_statistics).train(module.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return [name for name, _ in todo]


def quantize_linears(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                     skip=("lm_head", "classifier", "score", "pooler")) -> list[str]:
    """Quantise every Linear / Conv1D of ``model`` except those with a dotted name part in ``skip``
    (by default the task heads, which usually train or stay dense)."""
    skip = set(skip)
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or is_conv1d(m)) and not is_quantized_linear(m)
             and not skip.intersection(n.split("."))]
    return quantize_modules(model, names, quant_type, blocksize, compress_statistics)


def check_qlora_target(name: str, base: nn.Module, adapter_kwargs: dict) -> None:
    """Refuse, before anything changes, what a 4-bit base cannot take (used by lk.inject)."""
    if isinstance(base, nn.Embedding):
        return  # embeddings stay dense (quantize_modules skips them)
    if adapter_kwargs.get("init") not in INITS:
        raise ValueError(f"module {name!r}: init={adapter_kwargs.get('init')!r} is not supported on a 4-bit base "
                         f"(PiSSA would rewrite the frozen weight); use one of {INITS}")
    if adapter_kwargs.get("enable_lora") is not None:
        raise ValueError(f"module {name!r}: enable_lora (per-slice adapters) is not supported on a 4-bit base; "
                         "pass target_modules explicitly")


def lora_layer_class(module: nn.Module) -> type:
    """The LoRA layer class for a base module: QLoRALinear for 4-bit bases, else LoRALinear."""
    return QLoRALinear if is_quantized_linear(module) else LoRALinear


@torch.no_grad()
def merge_and_dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge every active adapter of ``model`` exactly into dense ``nn.Linear`` layers of ``dtype``
    (W = deq(Q) + s·B·A in fp32, then cast): no re-quantisation. LoRA layers on dense bases are merged
    as by :func:`lora_kernels.merge_and_unload`. Returns the model with no LoRA layer left."""
    from .model import lora_layers, merge_and_unload

    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QLoRALinear):
            continue
        if layer.merged:
            layer.unmerge()
        w = layer.weight.dequantize(torch.float32)
        if layer.active_adapter is not None and not layer.disabled:
            a = layer.active
            w = w + a.delta_weight()
            if a.use_dora:
                w = w * (a.lora_magnitude.detach().float() / layer._dora_norm(a).float())[:, None]
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                          device=w.device)
        dense.weight.copy_(w.to(dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.detach().to(dtype))
        dense.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, dense.train(layer.training))
    if not lora_layers(model):  # every adapted layer was 4-bit: nothing left for merge_and_unload
        if hasattr(model, "lora_configs"):
            del model.lora_configs
        return model
    return merge_and_unload(model)


# ------------------------------------------------------------------------------------------------
# PEFT's lora.bnb.Linear4bit


def is_peft_linear4bit(module: nn.Module) -> bool:
    """PEFT's ``lora.bnb.Linear4bit`` (or our converted subclass of it)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("peft.") for c in type(module).__mro__)


def _peft_unsupported(module) -> str | None:
    from .peft.layers import dropout_p as _dropout_p

    if not is_bnb_linear4bit(module.base_layer):
        return f"base layer {type(module.base_layer).__name__} is not a bitsandbytes Linear4bit"
    try:
        from_bnb(module.base_layer.weight)
    except (ValueError, TypeError) as exc:
        return str(exc)
    for name in module.lora_A.keys():
        if name in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False):
            return f"PEFT variant {type(module.lora_variant[name]).__name__}"
        if getattr(module, "lora_bias", {}).get(name, False):
            return "lora_bias=True"
        try:
            _dropout_p(module.lora_dropout[name])
        except TypeError as exc:
            return str(exc)
    return None


def _peft_fused_forward(self, x, *args, **kwargs):
    from .peft.layers import dropout_p as _dropout_p

    if args or kwargs:
        raise NotImplementedError(f"lora_kernels-converted PEFT layer: extra forward arguments ({len(args)} "
                                  f"positional, keywords {sorted(kwargs)}; e.g. adapter_names for mixed-adapter "
                                  "batches) are not supported")
    # the active adapters this layer has: PEFT's adapters may target different modules, so an active one
    # can be absent here (PEFT's own forward skips it too)
    active = [name for name in self.active_adapters if name in self.lora_A]
    if self.disable_adapters or self.merged or not active:
        return type(self).__mro__[1].forward(self, x)
    if len(active) != 1:
        raise NotImplementedError(f"lora_kernels-converted PEFT layer: {len(active)} active adapters on this "
                                  f"layer ({active}); one is supported")
    name = active[0]
    base = self.base_layer
    qw = from_bnb(base.weight)
    dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
    xc = x.to(dtype) if x.dtype != dtype else x
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    p = _dropout_p(self.lora_dropout[name])
    if self.use_dora.get(name, False):
        y = qlora.dora_linear(xc, qw, a, b, self.lora_magnitude_vector[name].weight, self.scaling[name],
                              bias=base.bias, dropout_p=p, training=self.training)
    else:
        y = qlora.lora_linear(xc, qw, a, b, self.scaling[name], bias=base.bias, dropout_p=p, training=self.training)
    return y.to(x.dtype) if y.dtype != x.dtype else y


def convert_peft_linear4bit(module: nn.Module, name: str, converted: list, skipped: dict) -> None:
    """Make one PEFT ``lora.bnb.Linear4bit`` compute with lora_kernels (class swap to the module-level
    :class:`lora_kernels.peft.bnb.Linear4bit`, as :func:`lora_kernels.peft.convert` does for dense
    layers); records the outcome. A subclass of PEFT's class is left to PEFT (its own forward may differ)."""
    from .peft.bnb import PEFT_CLASS, Linear4bit

    if type(module) is not PEFT_CLASS:
        skipped[name] = (f"{type(module).__module__}.{type(module).__qualname__} subclasses PEFT's "
                         "lora.bnb.Linear4bit; only PEFT's own class is converted, PEFT's forward is kept")
        return
    reason = _peft_unsupported(module)
    if reason is not None:
        skipped[name] = reason
        return
    qlora.prepare_for_compile()  # so torch.compile(fullgraph=True) names qlora.COMPILE_REASON
    module.__class__ = Linear4bit
    converted.append(name)


__all__ = ["QLoRALinear", "QuantLinear", "is_quantized_linear", "merge_and_dequantize", "quantize_linears",
           "quantize_modules"]

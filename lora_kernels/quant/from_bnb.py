"""Build a :class:`QuantizedWeight` from bitsandbytes objects without copying (bitsandbytes is optional:
nothing here imports it; the objects are read by attribute)."""
from __future__ import annotations

import torch

from .format import NestedAbsmax, QuantizedWeight


def is_bnb_params4bit(obj) -> bool:
    return type(obj).__name__ == "Params4bit" and hasattr(obj, "quant_state")


def is_bnb_linear4bit(module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or LinearNF4 / LinearFP4) module."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def from_bnb(param, quant_state=None) -> QuantizedWeight:
    """A QuantizedWeight sharing ``param``'s storage.

    Args:
        param: a quantised bitsandbytes ``Params4bit`` (its ``quant_state`` is used), or the packed
            data tensor together with ``quant_state``.
        quant_state: a bitsandbytes ``QuantState`` (required when ``param`` is a plain tensor).
    """
    if quant_state is None:
        quant_state = getattr(param, "quant_state", None)
        if quant_state is None:
            raise ValueError("from_bnb: param has no quant_state: quantise it first (bitsandbytes quantises a "
                             "Params4bit when it is moved to a device, e.g. .to('cpu') / .cuda()), or pass quant_state")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("from_bnb: this bitsandbytes weight was repacked for bitsandbytes' CPU inference kernel "
                         "(quant_state.packing_format_for_cpu); its bytes are no longer the 4-bit layout. Use the "
                         "layer in training mode, or undo it with bitsandbytes.functional."
                         "_convert_weight_packed_for_cpu_inverse before converting")
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"from_bnb: expected a Params4bit or a tensor, got {type(param).__name__}")
    shape = quant_state.shape
    if shape is None or len(shape) != 2:
        raise ValueError(f"from_bnb: the quant state's shape must be 2-D (out, in), got {shape}")
    nested = None
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        nested = NestedAbsmax(s2.absmax, s2.code, int(s2.blocksize), quant_state.offset)
    data = data.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    return QuantizedWeight(data, quant_state.absmax, tuple(int(s) for s in shape), quant_state.quant_type,
                           int(quant_state.blocksize), quant_state.code, quant_state.dtype, nested)


def to_bnb_quant_state(qw: QuantizedWeight):
    """A bitsandbytes ``QuantState`` for ``qw`` (shares tensors; needs bitsandbytes)."""
    from bitsandbytes.functional import QuantState

    state2 = offset = None
    if qw.nested is not None:
        state2 = QuantState(absmax=qw.nested.absmax, code=qw.nested.code, blocksize=qw.nested.blocksize,
                            dtype=torch.float32)
        offset = qw.nested.offset
    return QuantState(absmax=qw.absmax, shape=qw.shape, code=qw.code, blocksize=qw.blocksize,
                      quant_type=qw.quant_type, dtype=qw.dtype, offset=offset, state2=state2)

"""Several adapters in models: ``adapter_names=`` per row, and several active adapters.

- :func:`adapter_names_context` (and ``model(x, adapter_names=[...])`` / ``model.generate(...,
  adapter_names=[...])`` once :func:`enable_adapter_names` has run; ``inject`` runs it): every LoRA
  layer of the model gets a per-batch-row adapter index for the duration of the call, as PEFT's
  forward hooks do. ``"__base__"`` (``BASE_ADAPTER``) = the base model for that row; a name that a
  layer lacks counts as the base in that layer (PEFT does the same).
- :func:`set_active_adapters` (``set_adapter([...])`` in PEFT): several adapters active together;
  their outputs add up in order (PEFT's semantics, DoRA included: see multi/reference.py).

The layers call :func:`multi_forward` from their forward (a two-line hook in layers.py) whenever
one of these is in effect; the per-layer work is :func:`lora_kernels.multi.multi_adapter_linear`.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch

from .functional import multi_adapter_linear
from .store import AdapterSpec

BASE_ADAPTER = "__base__"
ROWS_ATTR = "_lk_multi_rows"      # (names tuple, {shape key: row index tensor}) while a mixed batch runs
ACTIVE_ATTR = "_lk_multi_active"  # list of this layer's active adapter names (several active)


def _lora_layers(model):
    from ..layers import LORA_LAYERS
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def layer_specs(layer) -> list[AdapterSpec]:
    """AdapterSpecs for every adapter of a LoRALinear / LoRAEmbedding, in the layer's order."""
    specs = []
    for name, a in layer.adapters.items():
        versioned = tuple(t for t in (a.lora_A, a.lora_B, a.lora_magnitude) if t is not None)
        specs.append(AdapterSpec(name, a.lora_A, a.full_b, a.scale, a.dropout,
                                 a.lora_magnitude if a.use_dora else None, versioned))
    return specs


# ------------------------------------------------------------------------------------------------
# per-layer forward


def _row_index(layer, batch: int, rows_per_item: int, device) -> torch.Tensor:
    """Adapter index of every flattened row, cached per (batch, rows per item, device) for the
    duration of the context (generate's decode steps reuse it: no host-to-device copy per step)."""
    names, cache = getattr(layer, ROWS_ATTR)
    key = (batch, rows_per_item, str(device), tuple(layer.adapters))
    if key not in cache:
        cache[key] = _build_row_index(layer, names, batch, rows_per_item, device)
    return cache[key]


def _build_row_index(layer, names, batch: int, rows_per_item: int, device) -> torch.Tensor:
    index = {n: i for i, n in enumerate(layer.adapters)}
    per_item = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64)
    if batch != len(names):
        if len(names) == 0 or batch % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows")
        per_item = per_item.repeat_interleave(batch // len(names))  # generate's beams / return sequences
    return per_item.repeat_interleave(rows_per_item).to(device)


def multi_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward of a LoRA layer while a mixed batch or several active adapters are in effect."""
    from ..layers import LoRAEmbedding

    if layer.merged:
        raise RuntimeError(f"adapter {layer.merged_adapter!r} is merged into the weight; unmerge() before using "
                           "adapter_names or several active adapters")
    if layer.disabled:
        return layer.base_layer(x)
    rows = getattr(layer, ROWS_ATTR, None)
    lead = tuple(x.shape) if isinstance(layer, LoRAEmbedding) else tuple(x.shape[:-1])
    batch = lead[0] if lead else 1
    per_item = (math.prod(lead) // batch) if batch else 0
    if rows is not None:
        row_adapter = _row_index(layer, batch, per_item, x.device)
        active = None
    else:
        index = {n: i for i, n in enumerate(layer.adapters)}
        active = [index[n] for n in getattr(layer, ACTIVE_ATTR) if n in index]
        row_adapter = None
    if isinstance(layer, LoRAEmbedding):
        return _embedding_forward(layer, x, row_adapter, active)
    specs = layer_specs(layer)
    return multi_adapter_linear(x, layer.weight, layer.bias, specs, row_adapter=row_adapter, active=active,
                                training=layer.training, backend=layer.backend, owner=layer,
                                weight_param=layer.base_layer.weight)


def _embedding_forward(layer, ids, row_adapter, active):
    """LoRAEmbedding: y = E[ids] + Σ s·(A[:, ids])ᵀ·Bᵀ over the row's adapters (plain torch: a gather)."""
    out = layer.base_layer(ids)
    flat_ids = ids.reshape(-1)
    out2d = out.reshape(flat_ids.shape[0], -1)
    adapters = list(layer.adapters.values())
    groups = [(None, i) for i in active] if active is not None else [
        ((row_adapter == i).nonzero().flatten(), i) for i in torch.unique(row_adapter).tolist() if i >= 0]
    for rows, i in groups:
        a = adapters[i]
        sel = flat_ids if rows is None else flat_ids.index_select(0, rows)
        upd = (layer._embed(sel, a.lora_A.t()) @ a.lora_B.t()) * a.scale
        out2d = out2d + upd if rows is None else out2d.index_add(0, rows, upd.to(out2d.dtype))
    return out2d.reshape(out.shape)


# ------------------------------------------------------------------------------------------------
# model level


def _model_adapters(layers) -> list[str]:
    names = []
    for layer in layers.values():
        names += [n for n in layer.adapters if n not in names]
    return names


def _check_adapter_names(adapter_names, known) -> tuple:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names (one per batch row), got "
                        f"{type(adapter_names).__name__}")
    bad = [n for n in adapter_names if not isinstance(n, str) or (n != BASE_ADAPTER and n not in known)]
    if bad:
        raise ValueError(f"adapter_names has unknown adapter(s) {sorted(set(map(str, bad)))}; the model has "
                         f"{known} (and {BASE_ADAPTER!r} for the base model)")
    return tuple(adapter_names)


@contextlib.contextmanager
def adapter_names_context(model, adapter_names):
    """Within the block, batch row i of every forward uses adapter ``adapter_names[i]``."""
    layers = _lora_layers(model)
    names = _check_adapter_names(adapter_names, _model_adapters(layers))
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"adapter_names cannot be used while an adapter is merged (layers {merged[:3]}...); "
                           "unmerge first")
    previous = {n: layer.__dict__.get(ROWS_ATTR) for n, layer in layers.items()}
    for layer in layers.values():
        layer.__dict__[ROWS_ATTR] = (names, {})
    try:
        yield model
    finally:
        for n, layer in layers.items():
            if previous[n] is None:
                layer.__dict__.pop(ROWS_ATTR, None)
            else:
                layer.__dict__[ROWS_ATTR] = previous[n]


def set_active_adapters(model, adapter_names) -> None:
    """Make several adapters active together (their outputs add up, in this order); one name (or a
    one-element list) is the ordinary single-adapter ``set_adapter``. Their parameters train."""
    from ..model import mark_only_lora_as_trainable, set_adapter

    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    layers = _lora_layers(model)
    known = _model_adapters(layers)
    names = list(adapter_names)
    if not names or len(set(names)) != len(names) or any(n not in known for n in names):
        raise ValueError(f"adapter_names must be distinct adapter names of the model {known}, got {names}")
    set_adapter(model, names[0])  # checks merges, clears any previous several-active state (layers hook)
    if len(names) == 1:
        return
    for layer in layers.values():
        present = [n for n in names if n in layer.adapters]
        if not present:
            layer.active_adapter = None
            continue
        layer.active_adapter = present[0]
        layer.__dict__[ACTIVE_ATTR] = present
    cfg = getattr(model, "lora_configs", {}).get(names[0])
    mark_only_lora_as_trainable(model, bias=cfg.bias if cfg else "none")
    for layer in layers.values():
        for n in layer.__dict__.get(ACTIVE_ATTR, ()):
            for p in layer.adapters[n].parameters():
                p.requires_grad_(True)


def active_adapters(model) -> list[str]:
    """The model's active adapters, in order."""
    out = []
    for layer in _lora_layers(model).values():
        for n in layer.__dict__.get(ACTIVE_ATTR) or ([layer.active_adapter] if layer.active_adapter else []):
            if n not in out:
                out.append(n)
    return out


def _batch_size(args, kwargs):
    for key in ("input_ids", "inputs_embeds", "x", "input"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    for t in args:
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return None


def _check_length(adapter_names, args, kwargs):
    batch = _batch_size(args, kwargs)
    if batch is not None and isinstance(adapter_names, (list, tuple)) and len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries; it needs one per batch row ({batch})")


def _names_pre_hook(module, args, kwargs):
    stack = module.__dict__.setdefault("_lk_names_ctx", [])
    stack.append(None)  # first, so the always-called post hook pops this call's entry even if we raise
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        return args, kwargs
    _check_length(adapter_names, args, kwargs)
    ctx = adapter_names_context(module, adapter_names)
    ctx.__enter__()
    stack[-1] = ctx
    return args, kwargs


def _names_post_hook(module, args, output):
    stack = module.__dict__.get("_lk_names_ctx")
    ctx = stack.pop() if stack else None
    if ctx is not None:
        ctx.__exit__(None, None, None)


def _generate_with_adapter_names(self, *args, adapter_names=None, **kwargs):
    original = type(self).generate
    if adapter_names is None:
        return original(self, *args, **kwargs)
    _check_length(adapter_names, args, kwargs)
    with adapter_names_context(self, adapter_names):
        return original(self, *args, **kwargs)


def enable_adapter_names(model) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` work
    (a forward pre-hook that takes the argument out, and ``generate`` wrapped for this instance, as
    a bound method so ``copy.deepcopy`` rebinds it to the copy). Idempotent."""
    if model.__dict__.get("_lk_adapter_names_enabled", False):
        return
    model.register_forward_pre_hook(_names_pre_hook, with_kwargs=True)
    model.register_forward_hook(_names_post_hook, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate_with_adapter_names, model)
    model.__dict__["_lk_adapter_names_enabled"] = True

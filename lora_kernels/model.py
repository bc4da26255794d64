"""Whole-model operations: inject adapters, mark what trains, several adapters, merge, LoRA+ groups,
and adapter save/load in PEFT's on-disk format (safetensors only, never pickle)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings

import torch
from torch import nn

from . import _atomic_io
from ._snapshot import all_or_nothing as _all_or_nothing
from ._patterns import compile_safe
from ._peft_config import read_peft_config
from .config import DEFAULT_ENABLE_LORA, DEFAULT_TARGETS, INITS, LoraConfig, rewrites_weight
from .layers import LORA_LAYERS, LoRAEmbedding, LoRALinear, is_conv1d
from .qlora_layers import check_qlora_target, in_out_features, is_quantized_linear, lora_layer_class, quantize_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SIDECAR = "lora_kernels.json"  # what PEFT's format cannot say (per-slice adapters); PEFT ignores it
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------
# finding modules


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, Conv1D and Embedding modules by name (LoRA layers count as their base; their insides
    are not listed)."""
    found = {}
    skip_prefixes = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, LORA_LAYERS):
            found[name] = module
            skip_prefixes.append(name + ".")
        elif _is_linear(module) or isinstance(module, nn.Embedding):
            found[name] = module
    return found


def _base_of(module):
    return module.base_layer if isinstance(module, LORA_LAYERS) else module


def _name_matches(name: str, spec, what: str = "target_modules") -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None  # spec was checked by compile_safe in resolve_targets
    return any(name == t or name.endswith("." + t) for t in spec)


# Modules whose parent reads their weight directly instead of calling them: an adapter there would
# never reach the forward (and merging it would change the output). PEFT wraps them all the same.
_BYPASSING_PARENTS = {
    nn.MultiheadAttention: "nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj",
    nn.TransformerEncoderLayer: "nn.TransformerEncoderLayer's inference fast path reads its linear weights "
                                "directly instead of calling the modules",
}


def _bypassed(model: nn.Module) -> dict[str, str]:
    """{module name: why its forward is bypassed} for the Linear modules inside _BYPASSING_PARENTS."""
    out = {}
    for pname, parent in model.named_modules():
        reason = next((why for cls, why in _BYPASSING_PARENTS.items() if isinstance(parent, cls)), None)
        if reason is None:
            continue
        for cname, child in parent.named_modules():
            if cname and (_is_linear(child) or isinstance(child, LORA_LAYERS)):
                out[f"{pname}.{cname}" if pname else cname] = reason
    return out


def _output_layer_names(model, modules) -> set[str]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in modules.items():
        if (head is not None and _base_of(m) is head) or name.split(".")[-1] == "lm_head":
            out.add(name)
    return out


def _model_type(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model`` (an error if none)."""
    modules = adaptable_modules(model)
    linear_names = [n for n, m in modules.items() if _is_linear(_base_of(m))]
    spec = config.target_modules
    if spec is None:
        mt = _model_type(model)
        if mt not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules is not set and there is no default for model type {mt!r}; "
                             f"pass target_modules (names, a regex or 'all-linear'). Linear modules: {linear_names}")
        spec = DEFAULT_TARGETS[mt]
    if isinstance(spec, str) and spec != "all-linear":
        compile_safe(spec, "target_modules")
    if isinstance(config.exclude_modules, str):
        compile_safe(config.exclude_modules, "exclude_modules")
    if spec == "all-linear":
        heads = _output_layer_names(model, modules)
        names = [n for n in linear_names if n not in heads]
    else:
        names = [n for n in modules if _name_matches(n, spec)]
    if config.exclude_modules is not None:
        names = [n for n in names if not _name_matches(n, config.exclude_modules, "exclude_modules")]
    if "" in names:
        raise ValueError(f"target_modules={spec!r} matches the model itself (a bare {type(model).__name__}): "
                         "lora_kernels replaces submodules of the model it is given. Wrap the layer directly "
                         "(lora_kernels.LoRALinear(layer, ...)) or pass a container that holds it")
    bypassed = _bypassed(model)
    skipped = {n: bypassed[n] for n in names if n in bypassed}
    if skipped:
        if spec != "all-linear":
            name, why = next(iter(skipped.items()))
            raise ValueError(f"target_modules={spec!r} selects {name!r}, which cannot be adapted: {why}, so an "
                             f"adapter would never reach the output (refused: {sorted(skipped)})")
        warnings.warn(f"target_modules='all-linear' skips {sorted(skipped)}: "
                      + "; ".join(sorted(set(skipped.values()))), UserWarning, stacklevel=3)
        names = [n for n in names if n not in skipped]
    if not names:
        raise ValueError(f"target_modules={spec!r} matches no module of {type(model).__name__}. "
                         f"Linear modules: {linear_names}")
    return names


def _effective_enable_lora(model, config: LoraConfig, name: str):
    mask = config.enable_lora_for(name)
    if mask is None and config.enable_lora is None and config.target_modules is None:
        defaults = DEFAULT_ENABLE_LORA.get(_model_type(model), {})
        for key, value in defaults.items():
            if name == key or name.endswith("." + key):
                return value
    return mask


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


# ------------------------------------------------------------------------------------------------
# inject and trainability


def _adapter_kwargs(model, config: LoraConfig, name: str) -> dict:
    return dict(rank=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.dropout,
                use_rslora=config.use_rslora, init=config.init, use_dora=config.use_dora,
                enable_lora=_effective_enable_lora(model, config, name))


def _tied_to(model: nn.Module, name: str, weight: torch.Tensor) -> str | None:
    """Name of another module holding ``weight`` (the same tensor, or a view of the same memory: same
    start and size; parameters that merely share a flat buffer, as under FSDP, are not tied), else None."""
    if not isinstance(weight, torch.Tensor):  # a 4-bit QuantizedWeight (QLoRA) is owned by its one layer
        return None
    ptr, size = weight.data_ptr(), weight.numel()
    for other, module in model.named_modules():
        if other == name or other.startswith(name + "."):
            continue
        for p in module.parameters(recurse=False):
            if p is weight or (size and p.device == weight.device and p.data_ptr() == ptr and p.numel() == size):
                return other[: -len(".base_layer")] if other.endswith(".base_layer") else other
    return None


def _check_new_adapter(model, name, module, adapter_name, init, enable_lora=None, use_dora=False):
    """Everything that would make adding ``adapter_name`` to ``module`` wrong, checked before any change."""
    base = _base_of(module)
    if isinstance(module, LORA_LAYERS):
        if adapter_name in module.adapters:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
        if module.merged:
            raise RuntimeError(f"module {name!r}: adapter {module.merged_adapter!r} is merged into its weight; "
                               f"unmerge(model) before adding {adapter_name!r} (a DoRA magnitude or a PiSSA/OLoRA "
                               "init would be computed from the merged weight)")
        residual = getattr(module, "_residual_adapter", None)
        if residual is not None:
            raise ValueError(f"module {name!r}: adapter {residual[0]!r} (init={residual[1]!r}) replaced the frozen "
                             f"weight by its residual, which would be shared with {adapter_name!r}; a pissa/olora "
                             "adapter must be the only one on its layers")
        if rewrites_weight(init) and len(module.adapters):
            raise ValueError(f"module {name!r}: init={init!r} rewrites the frozen weight, which is shared with "
                             f"adapters {list(module.adapters)}; a pissa/olora adapter must be the only one on its "
                             "layers")
    if isinstance(base, nn.Embedding):
        if use_dora or enable_lora is not None or init != "kaiming":
            raise ValueError(f"module {name!r} is an Embedding: only plain LoRA (no DoRA, enable_lora or "
                             "PiSSA/OLoRA) is supported there")
        return
    if rewrites_weight(init):
        tied = _tied_to(model, name, base.weight)
        if tied is not None:
            raise ValueError(f"module {name!r}: init={init!r} would rewrite its weight, which is tied to {tied!r}")
    out = base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]
    if is_quantized_linear(base):  # QLoRA (issue 17): bitsandbytes' weight has the packed shape
        out = in_out_features(base)[1]
    if enable_lora is not None:
        if out % len(enable_lora):
            raise ValueError(f"enable_lora for {name!r} has {len(enable_lora)} slices, which do not divide "
                             f"its {out} outputs")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={init!r} is not supported with enable_lora (module {name!r})")


def _check_target(model, config, name, module, adapter_name, quantize=None):
    kw = _adapter_kwargs(model, config, name)
    if quantize is not None or is_quantized_linear(_base_of(module)):  # QLoRA (issue 17)
        check_qlora_target(name, _base_of(module), kw)
    _check_new_adapter(model, name, module, adapter_name, kw["init"], kw["enable_lora"], kw["use_dora"])


def _check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default", backend: str | None = None,
           quantize: str | None = None, group_projections: bool | None = None) -> list[str]:
    """Add adapter ``adapter_name`` to the modules ``config`` targets; return their names.

    A plain Linear / Conv1D / Embedding is replaced by a LoRA layer wrapping it (frozen); a module
    that already is one gets another adapter. Everything is validated before anything changes, and a
    failure part-way (e.g. an SVD) puts the model back exactly as it was. Refused: the model itself
    as a target, modules whose parent bypasses their forward (MultiheadAttention.out_proj,
    TransformerEncoderLayer; "all-linear" skips them with a warning), layers whose adapter is merged,
    PiSSA/OLoRA next to another adapter on a layer or on a tied weight.
    Then only the active adapters' parameters (and biases per ``config.bias``) are left trainable.

    ``quantize``: 'nf4' | 'fp4' quantises the targeted Linear layers to 4 bits first (QLoRA, bitsandbytes'
    format, blocksize 64, nested statistics; see lora_kernels.qlora_layers). Layers that already are
    4-bit (ours or bitsandbytes' Linear4bit) are adapted as they are, with or without this argument.

    ``group_projections`` (None: ``config.group_projections``, True by default): then group the
    adapted q/k/v and gate/up projections of known Llama-style attention / MLP classes into
    shared-input projection groups (lora_kernels.groups; docs/projection-groups.md). False adds no
    group (groups already in the model stay, except those whose members this call changed, which are
    dissolved; ``lora_kernels.ungroup_projections`` removes them all).
    """
    if group_projections is not None and not isinstance(group_projections, bool):
        raise TypeError(f"group_projections must be a bool or None, got {group_projections!r}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_kernels.LoraConfig, got {type(config).__name__}")
    _check_adapter_name(adapter_name)
    names = resolve_targets(model, config)
    modules = adaptable_modules(model)
    for name in names:
        _check_target(model, config, name, modules[name], adapter_name, quantize)
    if quantize is not None:  # QLoRA (issue 17)
        quantize_modules(model, names, quantize)
        modules = adaptable_modules(model)
    previous = _active_name(model)
    rewritten = [_base_of(modules[n]).weight for n in names
                 if rewrites_weight(_adapter_kwargs(model, config, n)["init"])]
    with _all_or_nothing(model, rewritten):
        for name in names:
            module = modules[name]
            kw = _adapter_kwargs(model, config, name)
            if isinstance(module, LORA_LAYERS):
                module.add_adapter(adapter_name, **kw)
            elif isinstance(module, nn.Embedding):
                new = LoRAEmbedding(module, kw["rank"], kw["alpha"], use_rslora=kw["use_rslora"], backend=backend,
                                    adapter_name=adapter_name)
                _set_module(model, name, new.train(module.training))
            else:
                new = lora_layer_class(module)(module, adapter_name=adapter_name, backend=backend, **kw)
                _set_module(model, name, new.train(module.training))
        configs = dict(getattr(model, "lora_configs", {}) or {})
        configs[adapter_name] = config
        model.lora_configs = configs
        _finish_adding(model, previous, adapter_name)
    from .multi.glue import enable_adapter_names
    enable_adapter_names(model)  # model(..., adapter_names=[...]) and generate(..., adapter_names=[...])
    from .groups import _apply
    # add groups (or, opted out, only dissolve those whose members this call changed)
    _apply(model, (), known_only=True,
           add=config.group_projections if group_projections is None else group_projections)
    return names


def _active_name(model: nn.Module) -> str | None:
    """The model's active adapter (None before the first one)."""
    names = [layer.active_adapter for layer in lora_layers(model).values() if layer.active_adapter is not None]
    return names[0] if names else None


def _finish_adding(model: nn.Module, previous: str | None, added: str) -> None:
    """One adapter is active per model: the one that was (a new adapter waits for set_adapter),
    or the new one when it is the first."""
    set_adapter(model, previous if previous is not None else added)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the active adapters' parameters; biases per ``bias``:
    "none" (all frozen), "all" (every bias trains), "lora_only" (biases of adapted layers train)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in lora_layers(model).items():
        if layer.active_adapter is not None:
            for p in layer.adapters[layer.active_adapter].parameters():
                p.requires_grad_(True)
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "bias":
                p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# several adapters


def list_adapters(model: nn.Module) -> list[str]:
    names = []
    for layer in lora_layers(model).values():
        names += [n for n in layer.adapters if n not in names]
    return names


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` the model's adapter: active in every layer that has it, none active in
    the layers that do not (they compute as their base). Instant; the base is not touched.
    A list makes several adapters active together (lora_kernels.multi.set_active_adapters)."""
    if isinstance(adapter_name, (list, tuple)):
        from .multi.glue import set_active_adapters
        return set_active_adapters(model, adapter_name)
    all_layers = list(lora_layers(model).values())
    if not any(adapter_name in m.adapters for m in all_layers):
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {list_adapters(model)}")
    for layer in all_layers:
        if layer.merged and layer.merged_adapter != adapter_name:
            raise RuntimeError(f"adapter {layer.merged_adapter!r} is merged; unmerge(model) before switching")
    with _all_or_nothing(model):
        for layer in all_layers:
            if adapter_name in layer.adapters:
                layer.set_adapter(adapter_name)
            else:
                layer.active_adapter = None
        cfg = getattr(model, "lora_configs", {}).get(adapter_name)
        mark_only_lora_as_trainable(model, bias=cfg.bias if cfg else "none")


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name`` everywhere; deleting the active adapter is an error (set another first)."""
    layers = [m for m in lora_layers(model).values() if adapter_name in m.adapters]
    if not layers:
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {list_adapters(model)}")
    for layer in layers:
        if layer.active_adapter == adapter_name:
            raise RuntimeError(f"adapter {adapter_name!r} is active; set_adapter(model, other) before deleting it")
    with _all_or_nothing(model):
        for layer in layers:
            layer.delete_adapter(adapter_name)
        configs = dict(getattr(model, "lora_configs", {}) or {})
        configs.pop(adapter_name, None)
        model.lora_configs = configs


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its base (adapters skipped, nothing unloaded)."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("an adapter is merged into the weights; unmerge(model) before disabling adapters")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


# ------------------------------------------------------------------------------------------------
# merge


def _check_no_tied_weights(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Merging into a weight tied to another module (GPT-2's wte and lm_head) would change that module
    too (PEFT does so): refuse, naming both."""
    for name, layer in layers.items():
        tied = _tied_to(model, name, layer.base_layer.weight)
        if tied is not None:
            raise RuntimeError(f"cannot merge the adapter of {name!r}: its weight is tied to {tied!r}, which merging "
                               f"would change too (untie the weights, or keep this adapter unmerged)")


def _with_active(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in lora_layers(model).items() if m.active_adapter is not None}


def _to_merge(model: nn.Module, allow_none: bool = False) -> dict[str, nn.Module]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: nothing to merge (inject or load an adapter "
                         "first)")
    todo = {n: m for n, m in layers.items() if m.active_adapter is not None and not m.merged}
    if not todo and not allow_none:
        if any(m.merged for m in layers.values()):
            raise RuntimeError("the active adapter is already merged into every layer that has it")
        raise RuntimeError("no layer has an active adapter: set_adapter(model, name) first")
    return todo


@torch.no_grad()
def _merge_checked(model: nn.Module, safe: bool, allow_none: bool = False) -> None:
    """Check every layer first (tied weights, DoRA scale m/n zero or non-finite, and with ``safe``
    NaN/inf in the merged weight), then merge them all; a failure part-way unmerges what was merged."""
    if any(layer.__dict__.get("_lk_multi_active") for layer in lora_layers(model).values()):
        raise RuntimeError("several adapters are active; merging folds one adapter: set_adapter(model, name) first")
    todo = _to_merge(model, allow_none)
    _check_no_tied_weights(model, todo)
    for name, layer in todo.items():
        dora = isinstance(layer, LoRALinear) and layer.use_dora
        c = None
        if dora:
            c = layer.lora_magnitude.float() / layer.dora_weight_norm().float()
            if not torch.isfinite(c).all() or (c == 0).any():
                raise RuntimeError(f"cannot merge {name!r}: the DoRA scale m/n of adapter {layer.active_adapter!r} "
                                   "has zero or non-finite entries, so the merge could not be undone; nothing was "
                                   "merged")
        if safe:
            w = layer.weight.float() + layer.delta_weight()
            if c is not None:
                w = w * c[:, None]
            if not torch.isfinite(w.to(layer.weight.dtype)).all():
                raise ValueError(f"safe_merge: merging the adapter of {name!r} would put NaN/inf into its weight; "
                                 "nothing was merged")
    done = []
    try:
        for layer in todo.values():
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def merge(model: nn.Module) -> None:
    """Fold every layer's active adapter into its base weight (layers without one are left alone).
    Everything is checked first: on an error nothing is merged."""
    _merge_checked(model, safe=False)


def safe_merge(model: nn.Module) -> None:
    """Like :func:`merge`, but first checks every merged weight for NaN/inf; if any is not finite,
    nothing is written anywhere and a ValueError names the layer."""
    _merge_checked(model, safe=True)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of its weight again."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: nothing to unmerge")
    merged = [m for m in layers.values() if m.merged]
    if not merged:
        raise RuntimeError("nothing is merged: unmerge() has nothing to undo")
    done = []
    try:
        for layer in merged:
            layer.unmerge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.merge()
        raise


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters (those not merged yet) and put the plain base modules back (no LoRA
    layer is left)."""
    _merge_checked(model, safe=False, allow_none=True)
    from .groups import ungroup_projections
    ungroup_projections(model)  # no LoRA layer is left to group
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.base_layer)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


# ------------------------------------------------------------------------------------------------
# LoRA+


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024): B learns ``ratio``× faster than A.

    Groups: lora_A (lr), lora_B (lr·ratio), embedding adapters (lr_embedding), every other trainable
    parameter (lr). Pass to any torch optimizer: ``torch.optim.AdamW(loraplus_param_groups(m, 2e-4))``.
    """
    if not lr > 0 or not ratio > 0:
        raise ValueError(f"lr and ratio must be > 0, got lr={lr}, ratio={ratio}")
    groups = {"A": [], "B": [], "embedding": [], "other": []}
    seen = set()
    for layer in lora_layers(model).values():
        for adapter in layer.adapters.values():
            for pname, p in adapter.named_parameters():
                if not p.requires_grad:
                    continue
                seen.add(id(p))
                if isinstance(layer, LoRAEmbedding):
                    groups["embedding"].append(p)
                elif pname == "lora_B":
                    groups["B"].append(p)
                elif pname == "lora_A":
                    groups["A"].append(p)
                else:
                    groups["other"].append(p)
    groups["other"] += [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    lrs = {"A": lr, "B": lr * ratio, "embedding": lr_embedding, "other": lr}
    return [{"params": ps, "lr": lrs[k], "weight_decay": weight_decay, "name": k} for k, ps in groups.items() if ps]


# ------------------------------------------------------------------------------------------------
# state dict, save and load (PEFT's format)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk key names (adapter name removed):
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_magnitude_vector``,
    ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings, and trained biases."""
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapters}
    if not layers:
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {list_adapters(model)}")
    out = {}
    for name, layer in layers.items():
        a = layer.adapters[adapter_name]
        prefix = PEFT_PREFIX + name
        if isinstance(layer, LoRAEmbedding):
            out[prefix + ".lora_embedding_A"] = a.lora_A.detach()
            out[prefix + ".lora_embedding_B"] = a.lora_B.detach()
            continue
        out[prefix + ".lora_A.weight"] = a.lora_A.detach()
        out[prefix + ".lora_B.weight"] = a.full_b().detach()
        if a.use_dora:
            out[prefix + ".lora_magnitude_vector"] = a.lora_magnitude.detach()
    cfg = getattr(model, "lora_configs", {}).get(adapter_name)
    if cfg is not None and cfg.bias != "none":
        for pname, p in model.named_parameters():
            if pname.split(".")[-1] != "bias":
                continue
            owner = pname.rsplit(".", 2)[0] if ".base_layer." in pname else None
            if cfg.bias == "all" or (owner is not None and owner in layers):
                out[PEFT_PREFIX + pname] = p.detach()
    return {k: v.contiguous() for k, v in out.items()}


def _peft_config_dict(model, config: LoraConfig, adapter_name: str) -> tuple[dict, dict]:
    """(adapter_config.json content, sidecar content) for ``adapter_name``.

    The sidecar records every layer's own settings (rank, alpha, rsLoRA, dropout, init: an adapter
    name may span several inject calls with different configs), so our round trip is exact; the PEFT
    config expresses the same scales through rank_pattern / alpha_pattern under its global use_rslora.
    """
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapters}
    rank_pattern, alpha_pattern, enable, per_layer = {}, {}, {}, {}
    inits, doras = set(), set()
    any_conv1d = False
    for name, layer in layers.items():
        a = layer.adapters[adapter_name]
        init = getattr(a, "init", "kaiming")
        per_layer[name] = {"rank": a.rank, "alpha": a.alpha, "use_rslora": a.use_rslora, "dropout": a.dropout,
                           "init": init}
        inits.add(init if rewrites_weight(init) else "plain")
        if isinstance(layer, LoRALinear):
            doras.add(a.use_dora)
        rank, alpha = a.rank, a.alpha
        slices = 1
        if a.enable_lora is not None:  # a rank r·S PEFT adapter with the same scale
            slices = sum(a.enable_lora)
            enable[name] = a.enable_lora
            rank = a.rank * slices
        if a.use_rslora == config.use_rslora:
            alpha = a.alpha * ((math.sqrt(slices) if a.use_rslora else slices) if slices > 1 else 1)
        else:  # PEFT applies the file's use_rslora to every layer: give it the alpha with our scale
            alpha = a.scale * (math.sqrt(rank) if config.use_rslora else rank)
        if rank != config.rank:
            rank_pattern[re.escape(name)] = rank
        if alpha != config.alpha:
            alpha_pattern[re.escape(name)] = alpha
        any_conv1d |= isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    if len(inits) > 1 and inits - {"plain"}:
        raise ValueError(f"adapter {adapter_name!r} mixes initialisations {sorted(inits)} across layers; PEFT's "
                         "adapter_config.json has one init_lora_weights for all, so the file would reload wrongly "
                         "there. Save the layers as separate adapters")
    if len(doras) > 1:
        raise ValueError(f"adapter {adapter_name!r} is DoRA on some layers and LoRA on others; PEFT's "
                         "adapter_config.json has one use_dora for all. Save them as separate adapters")
    init = next(iter(inits)) if len(inits) == 1 else "plain"
    peft_cfg = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(layers), "exclude_modules": None, "use_rslora": config.use_rslora,
        "use_dora": True in doras, "bias": config.bias, "fan_in_fan_out": any_conv1d,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        # PiSSA/OLoRA adapters belong to the residual weight W − s·B0·A0: loaders (PEFT too) redo it first
        "init_lora_weights": init if init in ("pissa", "olora") else True,
        "modules_to_save": None,
    }
    sidecar = {"format": 2, "adapter_name": adapter_name, "enable_lora": enable, "init": config.init,
               "layers": per_layer}
    return peft_cfg, sidecar


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's format; PEFT's
    ``PeftModel.from_pretrained`` loads them) and a small ``lora_kernels.json`` sidecar.

    Atomic: the files are written into a new directory beside ``directory``, which then replaces it
    in one step (other files already in ``directory`` are kept). A crash at any point leaves the old
    adapter or the new one, never a mix (see ``lora_kernels._atomic_io``)."""
    from safetensors.torch import save as to_bytes

    cfg = getattr(model, "lora_configs", {}).get(adapter_name)
    if cfg is None:
        raise KeyError(f"no adapter named {adapter_name!r} was injected into this model "
                       f"(adapters: {list_adapters(model)})")
    for name, layer in lora_layers(model).items():
        a = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        init = getattr(a, "init", "kaiming") if a is not None else "kaiming"
        if init.startswith("pissa_niter_"):
            raise ValueError(f"adapter {adapter_name!r} was initialised with {init!r} (module {name!r}): its "
                             "randomized SVD cannot be redone at load time, so the saved A and B would not match the "
                             "residual weight. Use init='pissa' (exact SVD), or merge_and_unload(model) and save the "
                             "full model")
    tensors = lora_state_dict(model, adapter_name)
    peft_cfg, sidecar = _peft_config_dict(model, cfg, adapter_name)
    files = {
        ADAPTER_WEIGHTS: to_bytes({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"}),
        ADAPTER_CONFIG: json.dumps(peft_cfg, indent=2, allow_nan=False).encode(),
        SIDECAR: json.dumps(sidecar, indent=2, allow_nan=False).encode(),
    }
    _atomic_io.replace_directory(directory, files)


_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _read_adapter_files(directory):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    _atomic_io.recover(directory)  # a save killed between its two renames (systems without renameat2)
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(directory, "adapter_model.bin")) and path == w_path:
                raise ValueError(f"{directory} holds a pickled adapter_model.bin; lora_kernels reads safetensors only")
            raise FileNotFoundError(f"adapter file not found: {path}")
    peft_cfg = _read_json(cfg_path)
    if not isinstance(peft_cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (a PEFT LoRA config), got {type(peft_cfg).__name__}")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{w_path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    sidecar = {}
    side_path = os.path.join(directory, SIDECAR)
    if os.path.isfile(side_path):
        sidecar = _check_sidecar(_read_json(side_path), side_path)
    return peft_cfg, tensors, sidecar, cfg_path


def _check_sidecar(sidecar, path: str) -> dict:
    """lora_kernels.json, validated field by field (errors name the file and the field)."""
    if not isinstance(sidecar, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(sidecar).__name__}")
    enable = sidecar.get("enable_lora") or {}
    if not isinstance(enable, dict):
        raise ValueError(f"{path}: enable_lora must be an object {{module: [bool, ...]}}, got {enable!r}")
    for name, mask in enable.items():
        if not isinstance(mask, list) or not mask or not all(isinstance(b, bool) for b in mask) or not any(mask):
            raise ValueError(f"{path}: enable_lora[{name!r}] must be a non-empty list of true/false with at least one "
                             f"true, got {mask!r}")
    layers = sidecar.get("layers") or {}
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: layers must be an object {{module: settings}}, got {layers!r}")
    for name, entry in layers.items():
        where = f"{path}: layers[{name!r}]"
        if not isinstance(entry, dict) or "rank" not in entry or "alpha" not in entry:
            raise ValueError(f"{where} must be an object with rank and alpha, got {entry!r}")
        try:
            LoraConfig(rank=entry.get("rank"), alpha=entry.get("alpha"), dropout=entry.get("dropout", 0.0),
                       use_rslora=entry.get("use_rslora", False), init=entry.get("init", "kaiming"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if entry.get("init", "kaiming") not in INITS:
            raise ValueError(f"{where}: init {entry.get('init')!r} cannot be reloaded (one of {INITS})")
    return {"enable_lora": enable, "layers": layers}


def _config_from_peft(peft_cfg: dict, modules: list[str], path: str) -> LoraConfig:
    kwargs = read_peft_config(peft_cfg, path)
    try:
        return LoraConfig(target_modules=list(modules), source=path, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} has invalid settings: {exc}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 backend: str | None = None, group_projections: bool = True) -> list[str]:
    """Load an adapter saved by :func:`save_adapter` or by PEFT (``save_pretrained``) into ``model``.

    Every file, key, shape and rank is checked before the model is touched; on any error the model
    is left exactly as it was (weights, requires_grad, modules, flags). PEFT config keys that change
    the maths are applied or refused by name (docs/guarantees.md). Returns the adapted module names.
    Tensors are cast to the layers' dtype. ``group_projections``: as for :func:`inject`.
    """
    if not isinstance(group_projections, bool):
        raise TypeError(f"group_projections must be a bool, got {group_projections!r}")
    _check_adapter_name(adapter_name)
    peft_cfg, tensors, sidecar, cfg_path = _read_adapter_files(directory)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    biases = {}
    base_weights = {}  # PEFT saves a targeted embedding's full base weight (save_embedding_layers)
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"unexpected key {key!r} in {ADAPTER_WEIGHTS} (expected the prefix {PEFT_PREFIX!r})")
        rest = key[len(PEFT_PREFIX):]
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            if rest.endswith(".bias"):
                biases[rest] = value
                continue
            if rest.endswith(".base_layer.weight"):
                base_weights[rest[: -len(".base_layer.weight")]] = value
                continue
            raise ValueError(f"unexpected key {key!r} in {ADAPTER_WEIGHTS}")
        by_module.setdefault(rest[: -len(suffix)], {})[suffix] = value
    config = _config_from_peft(peft_cfg, sorted(by_module), cfg_path)
    modules = adaptable_modules(model)
    for name, value in base_weights.items():
        target = modules.get(name)
        if target is None or not isinstance(_base_of(target), nn.Embedding) or name not in by_module:
            raise ValueError(f"unexpected base weight for {name!r} in {ADAPTER_WEIGHTS} (only adapted embeddings "
                             "may carry one)")
        if tuple(value.shape) != tuple(_base_of(target).weight.shape):
            raise ValueError(f"{name}.base_layer.weight has shape {tuple(value.shape)}, the model's embedding "
                             f"{tuple(_base_of(target).weight.shape)}")
    missing = sorted(m for m in by_module if m not in modules)
    if missing:
        raise ValueError(f"the adapter has weights for modules the model lacks: {missing}")
    bypassed = _bypassed(model)
    for name in by_module:
        if name in bypassed:
            raise ValueError(f"the adapter adapts {name!r}, which lora_kernels cannot adapt: {bypassed[name]}")
    params = dict(model.named_parameters())
    # PEFT's key for an adapted layer's bias is <module>.base_layer.bias; before we wrap the module
    # that parameter is still <module>.bias (the same tensor afterwards).
    resolved = {}
    for key, value in biases.items():
        alt = key[: -len(".base_layer.bias")] + ".bias" if key.endswith(".base_layer.bias") else None
        resolved[key if key in params else (alt if alt in params else key)] = value
    biases = resolved
    bad_bias = sorted(b for b in biases if b not in params)
    if bad_bias:
        raise ValueError(f"the adapter has biases for parameters the model lacks: {bad_bias}")
    for pname, value in biases.items():
        if tuple(value.shape) != tuple(params[pname].shape):
            raise ValueError(f"bias {pname!r} in {ADAPTER_WEIGHTS} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(params[pname].shape)}")
    enable = dict(sidecar.get("enable_lora") or {})
    recorded = dict(sidecar.get("layers") or {})
    plan = {}
    for name, parts in by_module.items():
        base = _base_of(modules[name])
        embedding = isinstance(base, nn.Embedding)
        need = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        if any(n not in parts for n in need):
            raise ValueError(f"module {name!r}: missing {[n for n in need if n not in parts]} in {ADAPTER_WEIGHTS}")
        a, b = parts[need[0]], parts[need[1]]
        if embedding:
            n_in, n_out = base.weight.shape
        else:
            n_in, n_out = (base.weight.shape if is_conv1d(base) else base.weight.shape[::-1])
            if is_quantized_linear(base):  # QLoRA (issue 17)
                n_in, n_out = in_out_features(base)
        mask = enable.get(name)
        slices = sum(mask) if mask else 1
        own = recorded.get(name)
        if own is not None:  # our own file: the layer's exact settings
            rank, alpha, rslora, dropout, init = (own["rank"], own["alpha"], own.get("use_rslora", False),
                                                  own.get("dropout", config.dropout), own.get("init", "kaiming"))
            total_rank = rank * slices
        else:
            total_rank = config.rank_for(name)
            if total_rank % slices:
                raise ValueError(f"module {name!r}: rank {total_rank} is not divisible by its {slices} enabled slices")
            rank, rslora, dropout, init = total_rank // slices, config.use_rslora, config.dropout, config.init
            alpha = config.alpha_for(name)
            if mask:
                alpha = alpha / (math.sqrt(slices) if config.use_rslora else slices)
        if a.shape != (total_rank, n_in) or b.shape != (n_out, total_rank):
            raise ValueError(f"module {name!r}: the config says rank {total_rank}, so lora_A must be "
                             f"{(total_rank, n_in)} and lora_B {(n_out, total_rank)}; the file has "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        for label, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise ValueError(f"module {name!r}: {label} in {ADAPTER_WEIGHTS} has dtype {t.dtype}, expected a "
                                 "floating-point tensor")
        if embedding and ".lora_magnitude_vector" in parts:
            raise ValueError(f"module {name!r} is an Embedding with a DoRA magnitude: lora_kernels supports plain "
                             "LoRA on embeddings only")
        if config.use_dora and not embedding and ".lora_magnitude_vector" not in parts:
            raise ValueError(f"module {name!r}: use_dora is set but lora_magnitude_vector is missing")
        if ".lora_magnitude_vector" in parts and parts[".lora_magnitude_vector"].shape != (n_out,):
            raise ValueError(f"module {name!r}: lora_magnitude_vector must have shape {(n_out,)}, "
                             f"got {tuple(parts['.lora_magnitude_vector'].shape)}")
        if embedding:
            init = "kaiming"
        mag = parts.get(".lora_magnitude_vector")
        _check_new_adapter(model, name, modules[name], adapter_name, init, mask, mag is not None)
        plan[name] = (a, b, mag, mask, dict(rank=rank, alpha=alpha, dropout=dropout, use_rslora=rslora,
                                            use_dora=mag is not None, enable_lora=mask, init=init))

    # Everything checked: build the adapters. Any failure from here on restores the model.
    previous = _active_name(model)
    touched = [_base_of(modules[n]).weight for n, p in plan.items() if rewrites_weight(p[4]["init"])]
    touched += [params[p] for p in biases] + [_base_of(modules[n]).weight for n in base_weights]
    with _all_or_nothing(model, touched):
        for name, (a, b, mag, mask, kw) in plan.items():
            module = modules[name]
            if isinstance(module, LORA_LAYERS):
                module.add_adapter(adapter_name, **kw)
                layer = module
            elif isinstance(module, nn.Embedding):
                layer = LoRAEmbedding(module, kw["rank"], kw["alpha"], use_rslora=kw["use_rslora"], backend=backend,
                                      adapter_name=adapter_name).train(module.training)
                _set_module(model, name, layer)
            else:
                layer = lora_layer_class(module)(module, adapter_name=adapter_name, backend=backend,
                                                 **kw).train(module.training)
                _set_module(model, name, layer)
            _copy_adapter(layer.adapters[adapter_name], a, b, mag, name)
        with torch.no_grad():
            for pname, value in biases.items():
                params[pname].copy_(value.to(params[pname].dtype))
            for name, value in base_weights.items():  # a no-op unless PEFT saved a changed embedding
                emb = model.get_submodule(name).base_layer.weight
                if not torch.equal(emb, value.to(emb.dtype)):
                    emb.copy_(value.to(emb.dtype))
        configs = dict(getattr(model, "lora_configs", {}) or {})
        configs[adapter_name] = config
        model.lora_configs = configs
        _finish_adding(model, previous, adapter_name)
    from .multi.glue import enable_adapter_names
    enable_adapter_names(model)  # model(..., adapter_names=[...]) and generate(..., adapter_names=[...])
    from .groups import _apply
    _apply(model, (), known_only=True, add=group_projections)
    return sorted(plan)


@torch.no_grad()
def _copy_adapter(adapter, a, b, mag, name):
    adapter.lora_A.copy_(a.to(adapter.lora_A.dtype))
    if adapter.enable_lora is None:
        adapter.lora_B.copy_(b.to(adapter.lora_B.dtype))
    else:
        slices = len(adapter.enable_lora)
        slice_out = adapter.out_features // slices
        r = adapter.rank
        e = 0
        expected = torch.zeros_like(b)
        for i, on in enumerate(adapter.enable_lora):
            if on:
                block = b[i * slice_out:(i + 1) * slice_out, e * r:(e + 1) * r]
                adapter.lora_B[e * slice_out:(e + 1) * slice_out].copy_(block.to(adapter.lora_B.dtype))
                expected[i * slice_out:(i + 1) * slice_out, e * r:(e + 1) * r] = block
                e += 1
        if not torch.equal(expected, b):
            raise ValueError(f"module {name!r}: lora_B is not block-diagonal over the enabled slices "
                             f"{adapter.enable_lora} recorded in {SIDECAR}")
    if mag is not None:
        adapter.lora_magnitude.copy_(mag.to(adapter.lora_magnitude.dtype))

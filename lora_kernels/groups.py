"""Shared-input projection groups (issue 16, item 2): a torch-backend, model-level PROTOTYPE.

When several adapted projections read the same tensor (Llama's q/k/v read the attention norm's
output, gate/up the MLP norm's), one op computes all their outputs from one x:

    forward:   u_i = (x ⊙ Z_i)·A_iᵀ for every member i (p = 0: ONE product x·[A_1; A_2; ...]ᵀ, one
               read of x), then y_i = x·W_iᵀ + b_i + s_i·u_i·B_iᵀ
    backward:  dx = Σ_i (g_i·W_i + s_i·(v_i·A_i) ⊙ Z_i), accumulated into ONE buffer (in-place
               addmm/add), instead of autograd summing one M×K tensor per member

Each member keeps its own seed (drawn in member order, exactly as separate layers draw theirs), so
outputs and gradients equal the ungrouped layers' under the same RNG state. Saved for backward: x
once, u_i (M×r_i) and the seeds; never a mask.

What this prototype is not (yet): the Triton kernel that reads each x tile once and applies all the
members' masks in registers (it depends on the kernel rewrite of issue 13), automatic use by
``inject`` / ``convert``, DoRA members, per-slice (``enable_lora``) members, and torch.compile
registration (this is a plain autograd.Function). Members must use the torch backend.

Use: ``group_projections(model)`` after ``inject``; ``ungroup_projections(model)`` undoes it. The
modules, parameters and state dict are unchanged (only the members' classes are swapped).
"""
from __future__ import annotations

import torch
from torch import nn

from .dropout import draw_seed, dropout_mask
from .layers import LoRALinear

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _GroupedLoRAFunction(torch.autograd.Function):
    """tensors: (W_i, b_i or None, A_i, B_i) for each member, flattened."""

    @staticmethod
    def forward(ctx, x, dropout_p, seeds, scales, *tensors):
        n = len(scales)
        ws, bs, a_s, b_s = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        ranks = [a.shape[0] for a in a_s]
        if dropout_p == 0.0:  # one shrink for the whole group: one read of x
            us = list(torch.mm(x, torch.cat(a_s, 0).t()).split(ranks, dim=1))
        else:
            us = [torch.mm(x * dropout_mask(seeds[i], x.shape[0], x.shape[1], dropout_p, dtype=x.dtype,
                                            device=x.device), a_s[i].t()) for i in range(n)]
        ys = []
        for i in range(n):
            y = torch.addmm(bs[i], x, ws[i].t()) if bs[i] is not None else torch.mm(x, ws[i].t())
            ys.append(y.addmm_(us[i], b_s[i].t(), alpha=scales[i]))
        ctx.save_for_backward(x, *ws, *a_s, *b_s, *us)
        ctx.meta = (n, dropout_p, seeds, scales, [b is not None and b.requires_grad for b in bs])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        n, p, seeds, scales, bias_grad = ctx.meta
        saved = ctx.saved_tensors
        x, ws, a_s, b_s, us = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n], \
            saved[1 + 3 * n:]
        dx = None
        out = []
        for i, g in enumerate(grads):
            if g is None:
                out += [None, None, None, None]
                continue
            z = dropout_mask(seeds[i], x.shape[0], x.shape[1], p, dtype=x.dtype, device=x.device) if p > 0 else None
            v = g @ b_s[i]
            grad_b = torch.mm(g.t(), us[i]).mul_(scales[i])
            grad_a = torch.mm(v.t(), x if z is None else x * z).mul_(scales[i])
            if ctx.needs_input_grad[0]:
                if dx is None:
                    dx = torch.mm(g, ws[i])
                else:
                    dx.addmm_(g, ws[i])  # the members' dx accumulate in one buffer
                lora = v @ a_s[i]
                if z is not None:
                    lora.mul_(z)
                dx.add_(lora, alpha=scales[i])
            out += [None, g.sum(0) if bias_grad[i] else None, grad_a, grad_b]
        if dx is None and ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
        return (dx, None, None, None, *out)


# counted by the tests: one grouped shrink per group and forward
GROUP_CALLS = {"count": 0}


def grouped_lora_linear(x: torch.Tensor, layers: list[LoRALinear], training: bool) -> list[torch.Tensor]:
    """The outputs of ``layers`` (active LoRA adapters, one shared input ``x``) from one grouped op."""
    ps = {layer.active.dropout for layer in layers}
    if len(ps) != 1:
        raise ValueError(f"grouped projections need one dropout rate, got {sorted(ps)}")
    p = ps.pop() if training else 0.0
    seeds = tuple(draw_seed() for _ in layers) if p > 0 else tuple(0 for _ in layers)
    x2d = x.reshape(-1, x.shape[-1])
    tensors = []
    for layer in layers:
        a = layer.active
        tensors += [layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype),
                    a.lora_A.to(x.dtype), a.lora_B.to(x.dtype)]
    GROUP_CALLS["count"] += 1
    ys = _GroupedLoRAFunction.apply(x2d, p, seeds, tuple(layer.active.scale for layer in layers), *tensors)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


class ProjectionGroup:
    """Members that read the same input: the first member called with x computes every member's output;
    the others, called with that same x (same object, unchanged), take theirs from the cache."""

    def __init__(self, layers: list[LoRALinear]):
        self.layers = layers
        self._cache = None  # (x, x._version, outputs, members not yet served)

    def output(self, index: int, x: torch.Tensor, training: bool) -> torch.Tensor:
        c = self._cache
        if c is not None and c[0] is x and c[1] == x._version and index in c[3]:
            c[3].discard(index)
            y = c[2][index]
            if not c[3]:
                self._cache = None
            return y
        ys = grouped_lora_linear(x, self.layers, training)
        pending = set(range(len(self.layers))) - {index}
        self._cache = (x, x._version, ys, pending) if pending else None
        return ys[index]

    def usable(self) -> bool:
        return all(not m.merged and not m.disabled and m.active_adapter is not None for m in self.layers)


class GroupedLoRALinear(LoRALinear):
    """A LoRALinear member of a :class:`ProjectionGroup` (class swapped in place by group_projections)."""

    _lora_kernels_grouped = True

    def forward(self, x):
        group, index = self._projection_group
        if not group.usable():  # merged / disabled / no adapter: the layer's own path (it computes the base)
            return LoRALinear.forward(self, x)
        return group.output(index, x, self.training)


def _check_member(name: str, layer: nn.Module) -> None:
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a LoRALinear (inject first)")
    a = layer.active
    if a.use_dora or a.enable_lora is not None:
        raise ValueError(f"{name}: DoRA and per-slice (enable_lora) adapters are not supported by the group prototype")
    if layer.backend not in (None, "torch"):
        raise ValueError(f"{name}: backend {layer.backend!r}; the group prototype computes with torch ops")


def group_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[list[str]]:
    """Group the members of ``groups`` (child names) under every module that has all of them as
    LoRALinear children; returns the groups made (full names). Validates everything first."""
    found = []
    for parent_name, parent in model.named_modules():
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, LoRALinear) for m in members):
                full = [f"{parent_name}.{n}" if parent_name else n for n in names]
                for f, m in zip(full, members):
                    _check_member(f, m)
                    if getattr(type(m), "_lora_kernels_grouped", False):
                        raise ValueError(f"{f} is already grouped")
                if len({m.in_features for m in members}) != 1:
                    raise ValueError(f"{full}: members read inputs of different widths")
                found.append((full, members))
    if not found:
        raise ValueError(f"no module of {type(model).__name__} has all of {groups} as LoRALinear children")
    for _, members in found:
        group = ProjectionGroup(members)
        for i, m in enumerate(members):
            m._projection_group = (group, i)
            m.__class__ = GroupedLoRALinear
    return [full for full, _ in found]


def ungroup_projections(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if getattr(type(m), "_lora_kernels_grouped", False):
            m.__class__ = LoRALinear
            del m._projection_group
            n += 1
    return n


__all__ = ["DEFAULT_GROUPS", "GroupedLoRALinear", "ProjectionGroup", "group_projections", "grouped_lora_linear",
           "ungroup_projections"]

"""LoRA linear as ``torch.library`` custom ops with autograd registered.

``lora_kernels::lora_linear_fwd`` returns (y, u); ``lora_kernels::lora_linear_bwd`` returns
(dx, dA, dB). Their ``impl`` argument (resolved by :mod:`lora_kernels.backends`) selects the torch
backend or one of the Triton paths; the ops themselves are device-generic. Registering them as
custom ops with fake (meta) implementations lets ``torch.compile`` treat each as one opaque node.

Saved for backward: x, W, A, B and u (M×r); the seed and p as plain numbers. No mask and no
masked copy of x: the backward regenerates Z from the seed (DESIGN.md §2).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_backend


def _backend_module(impl: str):
    if impl == "torch":
        return torch_backend, {}
    from . import triton_backend  # needs Triton; only reached when a Triton path was resolved

    return triton_backend, {"path": impl}


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str,
) -> tuple[Tensor, Tensor]:
    """(y, u) for a 2-D x (M×K): y = x·Wᵀ + b + s·u·Bᵀ, u = (x⊙Z)·Aᵀ (M×r, kept for backward)."""
    module, kw = _backend_module(impl)
    return module.lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, **kw)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str, compute_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of DESIGN.md §2; dx is an empty tensor when ``compute_dx`` is False."""
    module, kw = _backend_module(impl)
    dx, da, db = module.lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale, dropout_p, seed,
                                        compute_dx, **kw)
    return (dx if dx is not None else x.new_empty((0,))), da, db


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, u, scale, dropout_p, seed, impl, compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, u)
    ctx.mark_non_differentiable(u)
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = scale, dropout_p, seed, impl


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_a, lora_b, u = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.lora_kernels.lora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, u, ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl, need_x)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    if need_w:  # W is normally frozen; if a caller trains it, dW = gᵀ·x (not fused, plain torch).
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# DoRA (DESIGN.md §3). Saved for backward: x, W, A, B, m, u (M×r), h = xd·Wᵀ + s·u·Bᵀ (M×N, x's
# dtype: dm needs it) and the detached row norm n (N, fp32). Nothing N×K; no mask.


@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, u, h, norm) for a 2-D x."""
    module, kw = _backend_module(impl)
    return module.dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, **kw)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl):
    m, n = x.shape[0], weight.shape[0]
    return (x.new_empty((m, n)), x.new_empty((m, lora_a.shape[0])), x.new_empty((m, n)),
            x.new_empty((n,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, u: Tensor,
    h: Tensor, norm: Tensor, scale: float, dropout_p: float, seed: int, impl: str, compute_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm); dx is an empty tensor when ``compute_dx`` is False."""
    module, kw = _backend_module(impl)
    dx, da, db, dm = module.dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale,
                                            dropout_p, seed, compute_dx, **kw)
    return (dx if dx is not None else x.new_empty((0,))), da, db, dm


@dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale, dropout_p, seed, impl, compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), magnitude.new_empty(magnitude.shape)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl = inputs
    _, u, h, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, u, h, norm)
    ctx.mark_non_differentiable(u, h, norm)
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = scale, dropout_p, seed, impl


def _dora_backward(ctx, grad_y, _grad_u, _grad_h, _grad_norm):
    x, weight, lora_a, lora_b, magnitude, u, h, norm = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    if need_w:
        raise RuntimeError("dora_linear: the frozen weight requires grad; DoRA trains the magnitude and the "
                           "adapters only (call weight.requires_grad_(False))")
    grad_x = grad_a = grad_b = grad_m = grad_bias = None
    if need_x or need_a or need_b or need_m:
        dx, da, db, dm = torch.ops.lora_kernels.dora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, ctx.scale, ctx.dropout_p, ctx.seed,
            ctx.impl, need_x)
        grad_x = dx if need_x else None
        grad_a, grad_b, grad_m = (da if need_a else None), (db if need_b else None), (dm if need_m else None)
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None, None, None


dora_linear_fwd.register_autograd(_dora_backward, setup_context=_dora_setup_context)

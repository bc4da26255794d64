"""LoRA linear as ``torch.library`` custom ops with autograd registered.

``lora_kernels::lora_linear_fwd`` returns (y, u); ``lora_kernels::lora_linear_bwd`` returns
(dx, dA, dB). Their ``impl`` argument (resolved by :mod:`lora_kernels.backends`) selects the torch
backend or one of the Triton paths; the ops themselves are device-generic. Registering them as
custom ops with fake (meta) implementations lets ``torch.compile`` treat each as one opaque node.

Saved for backward: x, W, A, B and u (M×r); the seed and p as plain numbers. No mask and no
masked copy of x: the backward regenerates Z from the seed (DESIGN.md §2).

The seed. Every op takes ``seed: int`` and an optional trailing ``seed_tensor`` (a 1-element integer
tensor, normally the int64 CPU tensor drawn by :func:`lora_kernels.dropout.draw_seed_tensor`); when
given, its value is the seed and ``seed`` is ignored. The value is read inside the op, so a seed
drawn in traced code (``seed=None`` under ``torch.compile``) never needs a ``.item()`` there; the
tensor is saved for backward (8 bytes), which therefore uses the same seed.

Autocast. The ops run with autocast switched off for their device: ``lora_kernels.functional``
casts the inputs to the autocast dtype before the call, and the implementations' own fp32 steps
(DoRA's norm, dm) must not be downcast, whether the op is called eagerly, from a compiled graph
or from a backward run inside an autocast region.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend


def _backend_module(impl: str):
    if impl == "torch":
        return torch_backend, {}
    from . import triton_backend  # needs Triton; only reached when a Triton path was resolved

    return triton_backend, {"path": impl}


def _seed_value(seed: int, seed_tensor: Optional[Tensor]) -> int:
    """The seed the kernels use: ``seed_tensor``'s value when given, else ``seed``."""
    if seed_tensor is None:
        return seed
    value = int(seed_tensor.reshape(-1)[0].item())  # a CPU tensor: no device synchronisation
    if not 0 <= value < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {value} (from a seed tensor)")
    return value


def refuse_forward_ad(op: str, *tensors: Optional[Tensor]) -> None:
    """Raise if forward-mode AD (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``) would
    pass through ``op``: the custom ops below have a reverse-mode rule only, and without this check
    torch silently gives them a zero (func.jvp) or missing (forward_ad) tangent."""
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) < 0:  # no forward-AD level is open: the common case
        return
    jvp = False
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        from torch._C._functorch import TransformType

        jvp = any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    if not jvp:
        jvp = any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if jvp:
        raise NotImplementedError(f"lora_kernels.{op}: forward-mode AD (torch.func.jvp / jacfwd / "
                                  "torch.autograd.forward_ad) is not supported: its custom ops have a reverse-mode "
                                  "rule only, and would otherwise yield a zero tangent. Use reverse mode "
                                  f"(torch.func.vjp / jacrev), or lora_kernels.reference.{op}_ref for forward mode")


def _autocast_off(device: torch.device):
    """Autocast disabled for ``device``'s type while an op runs (its inputs are already cast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str, seed_tensor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(y, u) for a 2-D x (M×K): y = x·Wᵀ + b + s·u·Bᵀ, u = (x⊙Z)·Aᵀ (M×r, kept for backward)."""
    module, kw = _backend_module(impl)
    seed = _seed_value(seed, seed_tensor)
    with _autocast_off(x.device):
        return module.lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, **kw)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl, seed_tensor=None):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str, compute_dx: bool,
    seed_tensor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of DESIGN.md §2; dx is an empty tensor when ``compute_dx`` is False."""
    module, kw = _backend_module(impl)
    seed = _seed_value(seed, seed_tensor)
    with _autocast_off(x.device):
        dx, da, db = module.lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale, dropout_p, seed,
                                            compute_dx, **kw)
    return (dx if dx is not None else x.new_empty((0,))), da, db


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, u, scale, dropout_p, seed, impl, compute_dx, seed_tensor=None):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl, seed_tensor = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, u, seed_tensor)
    ctx.mark_non_differentiable(u)
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = scale, dropout_p, seed, impl


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_a, lora_b, u, seed_tensor = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.lora_kernels.lora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, u, ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl, need_x,
            seed_tensor)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    with _autocast_off(grad_y.device):  # a backward run inside an autocast region: same dtypes as forward
        if need_w:  # W is normally frozen; if a caller trains it, dW = gᵀ·x (not fused, plain torch).
            grad_w = grad_y.t() @ x
        if need_bias:
            grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# DoRA (DESIGN.md §3). Saved for backward: x, W, A, B, m, u (M×r), h = xd·Wᵀ + s·u·Bᵀ (M×N, x's
# dtype: dm needs it) and the detached row norm n (N, fp32). Nothing N×K; no mask.


@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
    scale: float, dropout_p: float, seed: int, impl: str, seed_tensor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, u, h, norm) for a 2-D x."""
    module, kw = _backend_module(impl)
    seed = _seed_value(seed, seed_tensor)
    with _autocast_off(x.device):
        return module.dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, **kw)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl, seed_tensor=None):
    m, n = x.shape[0], weight.shape[0]
    return (x.new_empty((m, n)), x.new_empty((m, lora_a.shape[0])), x.new_empty((m, n)),
            x.new_empty((n,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, u: Tensor,
    h: Tensor, norm: Tensor, scale: float, dropout_p: float, seed: int, impl: str, compute_dx: bool,
    seed_tensor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm); dx is an empty tensor when ``compute_dx`` is False."""
    module, kw = _backend_module(impl)
    seed = _seed_value(seed, seed_tensor)
    with _autocast_off(x.device):
        dx, da, db, dm = module.dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale,
                                                dropout_p, seed, compute_dx, **kw)
    return (dx if dx is not None else x.new_empty((0,))), da, db, dm


@dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale, dropout_p, seed, impl, compute_dx,
      seed_tensor=None):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), magnitude.new_empty(magnitude.shape)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl, seed_tensor = inputs
    _, u, h, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, u, h, norm, seed_tensor)
    ctx.mark_non_differentiable(u, h, norm)
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = scale, dropout_p, seed, impl


def _dora_backward(ctx, grad_y, _grad_u, _grad_h, _grad_norm):
    x, weight, lora_a, lora_b, magnitude, u, h, norm, seed_tensor = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    grad_x = grad_a = grad_b = grad_m = grad_bias = grad_w = None
    if need_w:  # a trained base weight (or FSDP's use_orig_params view): dW in plain torch, n detached
        grad_w = _dora_grad_weight(grad_y, x, magnitude, norm, ctx.dropout_p, ctx.seed, seed_tensor)
    if need_x or need_a or need_b or need_m:
        dx, da, db, dm = torch.ops.lora_kernels.dora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, ctx.scale, ctx.dropout_p, ctx.seed,
            ctx.impl, need_x, seed_tensor)
        grad_x = dx if need_x else None
        grad_a, grad_b, grad_m = (da if need_a else None), (db if need_b else None), (dm if need_m else None)
    if need_bias:
        with _autocast_off(grad_y.device):
            grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


@torch.library.custom_op("lora_kernels::dropout_apply", mutates_args=())
def dropout_apply(x: Tensor, dropout_p: float, seed: int, seed_tensor: Optional[Tensor] = None) -> Tensor:
    """x ⊙ Z for a 2-D x, Z regenerated from the seed (an op, so a seed tensor is read inside it when traced)."""
    from .dropout import apply_dropout

    xd = apply_dropout(x, _seed_value(seed, seed_tensor), dropout_p)
    return xd.clone() if xd is x else xd  # an op's output may not alias its input


@dropout_apply.register_fake
def _(x, dropout_p, seed, seed_tensor=None):
    return torch.empty_like(x)


def _dora_grad_weight(grad_y, x, magnitude, norm, dropout_p, seed, seed_tensor):
    """dW of y = x·Wᵀ + (c − 1) ⊙ (xd·Wᵀ) + ... (c = m/n, n constant): gᵀ·x + (g ⊙ (c − 1))ᵀ·xd, which is
    (g ⊙ c)ᵀ·x without dropout. Not fused: training W is off the path the kernels are built for."""
    with _autocast_off(grad_y.device):
        c = magnitude.to(norm.dtype) / norm
        if dropout_p == 0.0:
            return (grad_y * c).to(grad_y.dtype).t() @ x
        xd = torch.ops.lora_kernels.dropout_apply(x, dropout_p, seed, seed_tensor)
        return grad_y.t() @ x + (grad_y * (c - 1.0)).to(grad_y.dtype).t() @ xd


dora_linear_fwd.register_autograd(_dora_backward, setup_context=_dora_setup_context)

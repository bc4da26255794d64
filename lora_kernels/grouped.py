"""Shared-input projection groups as one op: :func:`grouped_lora`.

Several adapted projections that read the same x (Llama's q/k/v; gate/up) are computed together:

    u_i = (x ⊙ Z_i)·A_iᵀ                       one shrink for the whole group: x read once
    y_i = x·W_iᵀ + b_i + s_i·u_i·B_iᵀ           the base GEMMs stay per member
    dx  = Σ_i g_i·W_i + s_i·((g_i·B_i)·A_i) ⊙ Z_i   accumulated into ONE buffer

Each member keeps its own seed, hence its own mask Z_i (the same bits as ``lora_linear`` with that
seed), so every output and gradient equals the separate layers'. Saved for backward: x once, the
members' u side by side (M × Σr) and the seeds; never a mask or a masked copy of x.

Launches, Triton backends (2 or 3 members, n = members):
  forward   1 grouped shrink (:mod:`lora_kernels.kernels.group_shrink`) + per member the base GEMM
            with the LoRA epilogue (the ``fused`` Triton GEMM, or cuBLAS then the epilogue for
            ``hybrid``, picked per member by :func:`lora_kernels.backends.resolve_backend`)
  backward  per member v_i = g_i·B_i and dB_i in one launch (:mod:`lora_kernels.kernels.shrink`);
            cuBLAS dx = g_1·W_1, dx += g_i·W_i (one buffer); 1 grouped launch
            (:mod:`lora_kernels.kernels.group_grad`) for every dA_i and dx += Σ s_i·(v_i·A_i) ⊙ Z_i
The torch backend does the same maths with torch ops (dx accumulated in place as well).

Registered as ``torch.library`` custom ops (``lora_kernels::grouped_lora_fwd`` / ``_bwd``) with fake
implementations and autograd, so ``torch.compile`` sees one opaque node per group.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import Tensor

from . import functions  # noqa: F401  (registers the single-layer ops; shares their helpers)
from ._validation import check_dropout, check_lora_inputs, check_scale, check_tensor
from .backends import MAX_KERNEL_RANK, _warn_once, requested_backend, resolve_backend
from .dropout import dropout_mask
from .functional import _autocast, _seed_arguments
from .functions import _autocast_off, refuse_forward_ad

MAX_MEMBERS = 4  # the Triton kernels' constexpr member count (lora_kernels.kernels.group_shrink)


# -- the torch backend -----------------------------------------------------------------------------------

def _torch_fwd(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds):
    ranks = [a.shape[0] for a in lora_as]
    if dropout_p == 0.0:  # one product with the stacked A's: one read of x
        u = torch.mm(x, torch.cat(lora_as, 0).t())
    else:
        u = torch.cat([torch.mm(x * dropout_mask(s, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype,
                                                 device=x.device), a.t()) for s, a in zip(seeds, lora_as)], 1)
    ys = []
    for w, b, lb, s, ui in zip(weights, biases, lora_bs, scales, u.split(ranks, 1)):
        y = torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
        ys.append(y.addmm_(ui, lb.t(), alpha=s))
    return ys, u


def _torch_bwd(grads, x, weights, lora_as, lora_bs, u, scales, dropout_p, seeds, compute_dx):
    ranks = [a.shape[0] for a in lora_as]
    dx, grad_as, grad_bs = None, [], []
    for g, w, a, b, ui, s, seed in zip(grads, weights, lora_as, lora_bs, u.split(ranks, 1), scales, seeds):
        z = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype, device=x.device) \
            if dropout_p > 0.0 else None
        v = g @ b
        grad_bs.append(torch.mm(g.t(), ui).mul_(s))
        grad_as.append(torch.mm(v.t(), x if z is None else x * z).mul_(s))
        if compute_dx:
            dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)  # every member into one buffer
            lora = v @ a
            if z is not None:
                lora.mul_(z)
            dx.add_(lora, alpha=s)
    return dx, grad_as, grad_bs


# -- the Triton backends ---------------------------------------------------------------------------------

def _triton_fwd(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds, paths):
    from .kernels.group_shrink import lora_group_shrink_fwd
    from .kernels.linear_fwd import lora_linear_fwd as linear_fwd

    ranks = [a.shape[0] for a in lora_as]
    u = lora_group_shrink_fwd(x, [a.contiguous() for a in lora_as], seeds, dropout_p)
    ys = []
    for w, b, lb, s, ui, path in zip(weights, biases, lora_bs, scales, u.split(ranks, 1), paths):
        if path == "fused":
            ys.append(linear_fwd(x, w, b, ui, lb, s))
        else:
            y = torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
            ys.append(linear_fwd(x, w, None, ui, lb, s, y=y))
    return ys, u


def _triton_bwd(grads, x, weights, lora_as, lora_bs, u, scales, dropout_p, seeds, compute_dx):
    from .kernels.group_grad import lora_group_grad_bwd
    from .kernels.shrink import _launch_shrink

    M = x.shape[0]
    ranks = [a.shape[0] for a in lora_as]
    v = torch.empty((M, sum(ranks)), dtype=x.dtype, device=x.device)
    grad_bs, dx = [], None
    for g, b, ui, vi, s in zip(grads, lora_bs, u.split(ranks, 1), v.split(ranks, 1), scales):
        grad_b = torch.empty(b.shape, dtype=x.dtype, device=x.device)
        if M == 0:
            grad_b.zero_()
        else:  # v_i = g_i·B_i (into its columns of v) and dB_i = s_i·g_iᵀ·u_i, one launch per member
            _launch_shrink(g, b, vi, tokens=M, features=g.shape[1], second=(g.t(), ui, grad_b), out_scale2=s)
        grad_bs.append(grad_b)
    if compute_dx:
        for g, w in zip(grads, weights):  # the base part of every member into one buffer (cuBLAS)
            dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
    grad_as = lora_group_grad_bwd(x, v, [a.contiguous() for a in lora_as], scales, seeds, dropout_p, dx)
    return dx, grad_as, grad_bs


# -- the custom ops --------------------------------------------------------------------------------------

def _seed_values(seeds: list[int], seed_tensor: Optional[Tensor]) -> list[int]:
    if seed_tensor is None:
        return list(seeds)
    values = [int(s) for s in seed_tensor.reshape(-1).tolist()]  # a CPU tensor: no device synchronisation
    for s in values:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {s} (from a seed tensor)")
    return values


def _bias_indices(n: int, bias_members: int) -> list[int]:
    return [i for i in range(n) if bias_members >> i & 1]


def _member_biases(n: int, biases: list[Tensor], bias_members: int) -> list[Optional[Tensor]]:
    out: list[Optional[Tensor]] = [None] * n
    for i, b in zip(_bias_indices(n, bias_members), biases):
        out[i] = b
    return out


@torch.library.custom_op("lora_kernels::grouped_lora_fwd", mutates_args=())
def grouped_lora_fwd(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], bias_members: int, lora_as: list[Tensor],
    lora_bs: list[Tensor], scales: list[float], dropout_p: float, seeds: list[int], impl: str,
    seed_tensor: Optional[Tensor],
) -> tuple[list[Tensor], Tensor]:
    """([y_i], u) for a 2-D x; u = [u_1 | u_2 | ...] (M × Σr). ``biases`` are the members' that have
    one, ``bias_members`` a bit mask of their member indices (a list with Nones would get no
    gradient through torch.library's autograd). ``impl``: 'torch', or the members' Triton paths joined by commas
    (e.g. 'fused,hybrid,hybrid'). ``seed_tensor`` (n int64 values, or None) overrides ``seeds``; it has
    no default because the dispatcher drops default-valued arguments, which breaks torch.library's
    autograd wrapper for ops with tensor-list arguments (torch 2.13)."""
    seeds = _seed_values(seeds, seed_tensor)
    biases = _member_biases(len(weights), biases, bias_members)
    with _autocast_off(x.device):
        if impl == "torch":
            return _torch_fwd(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds)
        return _triton_fwd(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds, impl.split(","))


@grouped_lora_fwd.register_fake
def _(x, weights, biases, bias_members, lora_as, lora_bs, scales, dropout_p, seeds, impl, seed_tensor):
    return ([x.new_empty((x.shape[0], w.shape[0])) for w in weights],
            x.new_empty((x.shape[0], sum(a.shape[0] for a in lora_as))))


@torch.library.custom_op("lora_kernels::grouped_lora_bwd", mutates_args=())
def grouped_lora_bwd(
    grads: list[Tensor], x: Tensor, weights: list[Tensor], lora_as: list[Tensor], lora_bs: list[Tensor], u: Tensor,
    scales: list[float], dropout_p: float, seeds: list[int], impl: str, compute_dx: bool,
    seed_tensor: Optional[Tensor],
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(dx, [dA_i], [dB_i]); dx is an empty tensor when ``compute_dx`` is False."""
    seeds = _seed_values(seeds, seed_tensor)
    with _autocast_off(x.device):
        run = _torch_bwd if impl == "torch" else _triton_bwd
        dx, grad_as, grad_bs = run(grads, x, weights, lora_as, lora_bs, u, scales, dropout_p, seeds, compute_dx)
    if compute_dx and dx is None:  # no member (cannot happen through grouped_lora) or K == 0
        dx = torch.zeros_like(x)
    return (dx if dx is not None else x.new_empty((0,))), grad_as, grad_bs


@grouped_lora_bwd.register_fake
def _(grads, x, weights, lora_as, lora_bs, u, scales, dropout_p, seeds, impl, compute_dx, seed_tensor):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, [a.new_empty(a.shape) for a in lora_as], [b.new_empty(b.shape) for b in lora_bs]


def _setup_context(ctx, inputs, output):
    x, weights, biases, bias_members, lora_as, lora_bs, scales, dropout_p, seeds, impl, seed_tensor = inputs
    _, u = output
    n = len(weights)
    ctx.set_materialize_grads(False)  # an output that reached no loss arrives as None (see _backward)
    ctx.save_for_backward(x, u, seed_tensor, *weights, *lora_as, *lora_bs)
    ctx.mark_non_differentiable(u)
    ctx.n, ctx.scales, ctx.dropout_p, ctx.seeds, ctx.impl = n, list(scales), dropout_p, list(seeds), impl
    # needs_input_grad holds one bool per list argument: record which members' tensors need theirs
    ctx.need = {name: [t.requires_grad for t in ts] for name, ts in (("bias", biases), ("a", lora_as), ("b", lora_bs))}
    ctx.bias_members = _bias_indices(n, bias_members)


def _backward(ctx, grad_ys, _grad_u):
    x, u, seed_tensor, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs = rest[:n], rest[n:2 * n], rest[2 * n:]
    need_x = ctx.needs_input_grad[0]
    need_bias, need_a, need_b = ctx.need["bias"], ctx.need["a"], ctx.need["b"]
    # a member whose output reached no loss gets no gradient (None, as a separate layer would), not zeros
    used = [g is not None for g in grad_ys]
    need_a = [need and use for need, use in zip(need_a, used)]
    need_b = [need and use for need, use in zip(need_b, used)]
    need_bias = [need and used[i] for i, need in zip(ctx.bias_members, need_bias)]
    grads = [g if g is not None else x.new_zeros((x.shape[0], w.shape[0])) for g, w in zip(grad_ys, weights)]
    grad_x, none = None, [None] * n
    grad_as = grad_bs = none
    grad_bias = [None] * len(need_bias)
    if need_x or any(need_a) or any(need_b):
        dx, da, db = torch.ops.lora_kernels.grouped_lora_bwd(grads, x, list(weights), list(lora_as), list(lora_bs), u,
                                                             ctx.scales, ctx.dropout_p, ctx.seeds, ctx.impl, need_x,
                                                             seed_tensor)
        grad_x = dx if need_x else None
        grad_as = [d if need else None for d, need in zip(da, need_a)]
        grad_bs = [d if need else None for d, need in zip(db, need_b)]
    if any(need_bias):
        with _autocast_off(x.device):
            grad_bias = [grads[i].sum(0) if need else None for i, need in zip(ctx.bias_members, need_bias)]
    return grad_x, none, grad_bias, None, grad_as, grad_bs, None, None, None, None, None


grouped_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# -- the public function ---------------------------------------------------------------------------------

def _check_lists(weights, biases, lora_as, lora_bs, scales, seeds) -> int:
    lists = {"weights": weights, "biases": biases, "lora_as": lora_as, "lora_bs": lora_bs, "scales": scales,
             "seeds": seeds}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list (one entry per member), got {type(value).__name__}")
    n = len(weights)
    if n == 0:
        raise ValueError("weights is empty: a projection group needs at least one member")
    wrong = {name: len(v) for name, v in lists.items() if len(v) != n}
    if wrong:
        raise ValueError(f"every per-member list must have len(weights) = {n} entries, got "
                         + ", ".join(f"{k}: {v}" for k, v in wrong.items()))
    return n


# a single-layer check's argument names -> the per-member list entries of grouped_lora
_MEMBER_ARGS = {"weight": "weights", "lora_a": "lora_as", "lora_b": "lora_bs", "bias": "biases", "scale": "scales",
                "seed": "seeds"}
_MEMBER_NAME = re.compile(r"\b(weight|lora_a|lora_b|bias|scale|seed)\b(?!s\[)")


def _member_message(message: str, i: int) -> str:
    """A ``lora_linear`` check's message for member ``i``: its argument names become the list entries
    (``lora_a`` -> ``lora_as[i]``); a message about several arguments gets a ``member i:`` prefix."""
    named = _MEMBER_NAME.sub(lambda m: f"{_MEMBER_ARGS[m.group(1)]}[{i}]", message)
    return named if named != message and _MEMBER_NAME.match(message) else f"member {i}: {named}"


def grouped_lora(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds, backend=None) -> list[Tensor]:
    """The outputs y_i = x·W_iᵀ + b_i + s_i·((x ⊙ Z_i)·A_iᵀ)·B_iᵀ of the members of a projection group.

    Args:
        x: (..., K), shared by every member.
        weights: [W_i (N_i × K)], frozen (a weight that requires grad is refused); x's dtype.
        biases: [b_i (N_i,) or None]. lora_as: [A_i (r_i × K)]. lora_bs: [B_i (N_i × r_i)].
        scales: [s_i] (floats). dropout_p: p in [0, 1), shared by the members (0: no dropout; the
            caller passes 0 in eval mode).
        seeds: [seed_i], each as ``lora_linear``'s ``seed``: an int in [0, 2**63), a 1-element
            integer tensor, or None (drawn from torch's CPU generator, in member order, only if p > 0).
        backend: as ``lora_linear``'s (lora_kernels.backends); an explicit Triton backend where it
            cannot run is an error (more than 4 members too). Under 'auto', a member that would use the
            torch backend (a rank above 256, float64, a CPU tensor), or more than 4 members, put the
            whole group on the torch backend (on CUDA with a one-time RuntimeWarning when it is the
            member count or a rank that moved it).

    Returns:
        [y_i of shape (..., N_i)], each equal (outputs and gradients) to
        ``lora_linear(x, W_i, A_i, B_i, s_i, bias=b_i, dropout_p=dropout_p, seed=seed_i, backend=backend)``.
        Autocast and dtypes as in ``lora_linear`` (adapters and biases cast to x's dtype).
    """
    n = _check_lists(weights, biases, lora_as, lora_bs, scales, seeds)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    refuse_forward_ad("grouped_lora", x, *weights, *lora_as, *lora_bs, *biases)
    x = _autocast(x, None, None, None, None)[0]
    dropout_p = check_dropout(dropout_p)
    ws, bs, a_s, b_s, ss = [], [], [], [], []
    for i in range(n):  # validate every member before any seed is drawn (seeds=None draws, in member order)
        w = weights[i]
        if isinstance(w, torch.Tensor) and w.requires_grad:
            raise ValueError(f"weights[{i}] requires grad: grouped_lora computes no weight gradient (the base weight "
                             "is frozen); use lora_linear for a trained base weight")
        _, w, a, b, bias = _autocast(x, w, lora_as[i], lora_bs[i], biases[i])
        try:
            check_lora_inputs(x, w, a, b, bias)
            s = check_scale(scales[i])
            if seeds[i] is not None:
                _seed_arguments(seeds[i], dropout_p)  # checks an int or a seed tensor; draws nothing
        except (TypeError, ValueError) as e:
            raise type(e)(_member_message(str(e), i)) from None
        ws.append(w)
        bs.append(None if bias is None else bias.to(x.dtype))
        a_s.append(a.to(x.dtype))
        b_s.append(b.to(x.dtype))
        ss.append(s)
    seed_ints, seed_tensors = [], []
    for seed in seeds:  # then draw (seeds=None with p > 0), in member order as the separate layers do
        seed, seed_t = _seed_arguments(seed, dropout_p)
        seed_ints.append(seed)
        seed_tensors.append(seed_t)
    seed_tensor = None
    if dropout_p > 0.0 and any(t is not None for t in seed_tensors):
        seed_tensor = torch.cat([t.reshape(1).to(device="cpu", dtype=torch.int64) if t is not None
                                 else torch.tensor([s], dtype=torch.int64) for t, s in zip(seed_tensors, seed_ints)])
    rows = math.prod(x.shape[:-1])
    x2d = x.reshape(rows, x.shape[-1])
    impls = [resolve_backend(backend, x2d, w.shape[0], a.shape[0]) for w, a in zip(ws, a_s)]
    requested = requested_backend(backend)
    if "torch" in impls or (n > MAX_MEMBERS and requested == "auto"):
        if requested == "auto" and any(i != "torch" for i in impls):  # Triton could run some members: say so
            why = (f"{n} members (the Triton grouped kernels take at most {MAX_MEMBERS})" if n > MAX_MEMBERS else
                   f"a member of rank {max(a.shape[0] for a in a_s)} > {MAX_KERNEL_RANK}")
            _warn_once("group-torch", f"lora_kernels: a projection group with {why} runs wholly on the (slower) "
                       "torch backend under backend='auto'; split the group or lower the rank to keep Triton")
        impl = "torch"
    else:
        if n > MAX_MEMBERS:
            raise ValueError(f"the Triton grouped kernels take at most {MAX_MEMBERS} members, got {n}; "
                             "use backend='torch' or 'auto', or split the group")
        impl = ",".join(impls)
    bias_members = sum(1 << i for i, b in enumerate(bs) if b is not None)
    ys, _ = torch.ops.lora_kernels.grouped_lora_fwd(x2d, ws, [b for b in bs if b is not None], bias_members, a_s, b_s,
                                                    ss, dropout_p, seed_ints, impl, seed_tensor)
    return [y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]


__all__ = ["grouped_lora"]

"""The torch backend: DESIGN.md §2 forward and backward written with plain torch ops.

It runs on any device (CPU, CUDA, MPS, ...) and is what the custom ops run for non-CUDA tensors.
It has the same contract as the Triton backend (:mod:`lora_kernels.triton_backend`): forward
returns (y, u) and backward needs only x, u and the seed; the dropout mask is regenerated, never
stored. (Its forward and backward do build x ⊙ Z transiently; only the Triton kernels avoid that.)
"""
from __future__ import annotations

import torch

from .dora import dora_weight_norm_torch
from .dropout import dropout_mask


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, seed: int):
    """(y, u) with u = (x ⊙ Z)·Aᵀ and y = x·Wᵀ + b + s·u·Bᵀ, for a 2-D x (M×K)."""
    xd = x
    if dropout_p > 0.0:
        xd = x * dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype, device=x.device)
    u = xd @ lora_a.t()
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(u, lora_b.t(), alpha=scale)
    return y, u


def lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale: float, dropout_p: float, seed: int,
                    compute_dx: bool):
    """(dx or None, dA, dB) from g (M×N) and the saved x, u; the mask is regenerated from the seed."""
    z = None
    if dropout_p > 0.0:
        z = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype, device=x.device)
    v = grad_y @ lora_b
    grad_b = torch.mm(grad_y.t(), u).mul_(scale)
    grad_a = torch.mm(v.t(), x if z is None else x * z).mul_(scale)
    grad_x = None
    if compute_dx:
        lora_term = v @ lora_a
        if z is not None:
            lora_term.mul_(z)
        grad_x = torch.mm(grad_y, weight).add_(lora_term, alpha=scale)
    return grad_x, grad_a, grad_b


def dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, scale: float, dropout_p: float, seed: int):
    """(y, u, h, norm) of DoRA (DESIGN.md §3, PEFT's formula) for a 2-D x.

    norm (N, fp32) is the detached row norm; h (M×N) = xd·Wᵀ + s·u·Bᵀ is what dm needs in backward.
    """
    norm = dora_weight_norm_torch(weight, lora_a, lora_b, scale)
    c = magnitude.to(norm.dtype) / norm
    acc = c.dtype
    xd = x
    if dropout_p > 0.0:
        xd = x * dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype, device=x.device)
    u = xd @ lora_a.t()
    base = torch.nn.functional.linear(x, weight, bias)  # the frozen layer's own output
    lora = (u @ lora_b.t()).to(acc).mul_(scale)
    if dropout_p > 0.0:
        plain = (xd @ weight.t()).to(acc)
    else:
        plain = base.to(acc)
        if bias is not None:
            plain = plain - bias.to(acc)
    h = plain + lora
    # PEFT's form: y = base + (c − 1)·P + c·s·u·Bᵀ; at init (c == 1, B == 0) y is base bit for bit
    y = base.to(acc) + ((c - 1.0) * plain + c * lora)
    return y.to(x.dtype), u, h.to(x.dtype), norm


def dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale: float, dropout_p: float,
                    seed: int, compute_dx: bool):
    """(dx or None, dA, dB, dm): the LoRA backward with g := g ⊙ c, plus dm = Σ_rows g ⊙ h / n."""
    c = magnitude.to(norm.dtype) / norm
    grad_c = (grad_y * c).to(grad_y.dtype)
    z = None
    if dropout_p > 0.0:
        z = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype=x.dtype, device=x.device)
    v = grad_c @ lora_b
    grad_b = torch.mm(grad_c.t(), u).mul_(scale)
    grad_a = torch.mm(v.t(), x if z is None else x * z).mul_(scale)
    grad_m = ((grad_y.to(norm.dtype) * h.to(norm.dtype)).sum(0) / norm).to(magnitude.dtype)
    grad_x = None
    if compute_dx:
        lora_term = (v @ lora_a).mul_(scale)
        if z is None:
            grad_x = torch.mm(grad_c, weight).add_(lora_term)
        else:  # dx = g·W + Z ⊙ ((g ⊙ (c − 1))·W + s·v·A)
            inner = torch.mm((grad_y * (c - 1.0)).to(grad_y.dtype), weight).add_(lora_term)
            grad_x = torch.mm(grad_y, weight).add_(inner.mul_(z))
    return grad_x, grad_a, grad_b, grad_m

"""The Triton backend: composes the kernels of :mod:`lora_kernels.kernels` into LoRA's and DoRA's
forward and backward, for the two paths of DESIGN.md §4.

- ``fused``:  y = [x·Wᵀ + b + s·u·Bᵀ] in one Triton GEMM;  dx = [g·W + s·(v·A)⊙Z] in one Triton GEMM.
- ``hybrid``: cuBLAS (torch.mm) for x·Wᵀ + b and g·W; Triton adds s·u·Bᵀ into y and s·(v·A)⊙Z into
  dx in place.

Both: u = (x⊙Z)·Aᵀ with Z made in registers; v = g·B and dB = s·gᵀ·u in one launch; dA = s·vᵀ·(x⊙Z)
in the dx launch; every reduction in a fixed order by one program (deterministic, no finishing
launches). Launches for one LoRA forward + backward: fused 4 (shrink, GEMM+expand, v+dB, dx+dA),
hybrid 6 (the same plus cuBLAS's x·Wᵀ and g·W). Same contract as :mod:`lora_kernels.torch_backend`.

DoRA (DESIGN.md §3) reuses the same kernels: c = m/n enters the forward epilogue in PEFT's form
y = base + ((c − 1)·P + c·s·u·Bᵀ), exact at init (the epilogue also writes h for dm), and the dx
GEMM (g ⊙ c formed in registers); v = g·(c ⊙ B) and dB = c ⊙ (s·gᵀ·u),
so no g ⊙ c tensor is needed on the fused path. With dropout, PEFT's formula needs xd·Wᵀ: x ⊙ Z is
written once by the shrink kernel as a transient GEMM operand (freed after the forward, never saved).

On the fused path ``weight`` may be a :class:`lora_kernels.quant.QuantizedWeight` (QLoRA): the GEMM
kernels and DoRA's norm decode its tiles in registers (:func:`lora_kernels.kernels.dequant.load_w4`).
The hybrid path needs a dense weight (lora_kernels.qlora dequantises into its scratch buffer first).
"""
from __future__ import annotations

import torch

from .kernels.dora import dora_magnitude_grad_bwd, dora_weight_norm
from .kernels.linear_bwd import lora_linear_bwd as _linear_bwd
from .kernels.linear_fwd import lora_linear_fwd as _linear_fwd
from .kernels.shrink import lora_grad_shrink_bwd, lora_shrink_fwd

PATHS = ("fused", "hybrid")


def _check_dtypes(x, *others):
    """The kernels take one compute dtype (the functional API casts adapters; this guards direct op calls)."""
    for t in others:  # a 4-bit weight (QuantizedWeight, fused path) is decoded into x's dtype in the kernels
        if isinstance(t, torch.Tensor) and t.dtype != x.dtype:
            raise TypeError(f"Triton LoRA kernels need one dtype: x is {x.dtype}, got a {t.dtype} operand")


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, seed: int, path: str):
    _check_dtypes(x, weight, bias, lora_a, lora_b)
    u = lora_shrink_fwd(x, lora_a, seed, dropout_p)
    if path == "fused":
        y = _linear_fwd(x, weight, bias, u, lora_b, scale)
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        _linear_fwd(x, weight, None, u, lora_b, scale, y=y)
    return y, u


def lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale: float, dropout_p: float, seed: int,
                    compute_dx: bool, path: str):
    v, grad_b = lora_grad_shrink_bwd(grad_y, lora_b, u, scale)
    dx = torch.mm(grad_y, weight) if (compute_dx and path == "hybrid") else None
    grad_x, grad_a = _linear_bwd(grad_y, weight, v, lora_a, x, scale, seed, dropout_p, dx=dx, compute_dx=compute_dx)
    return grad_x, grad_a, grad_b


def dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, scale: float, dropout_p: float, seed: int,
                    path: str):
    _check_dtypes(x, weight, bias, lora_a, lora_b)
    M, N = x.shape[0], weight.shape[0]
    norm = dora_weight_norm(weight, lora_a, lora_b, scale)
    c = magnitude.float() / norm
    x_dropped = torch.empty_like(x, memory_format=torch.contiguous_format) if dropout_p > 0.0 else None
    u = lora_shrink_fwd(x, lora_a, seed, dropout_p, dropped=x_dropped)
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if path == "fused":
        y = _linear_fwd(x, weight, bias, u, lora_b, scale, dora_scale=c, h=h, x_dropped=x_dropped)
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())  # the base output
        if x_dropped is not None:
            torch.mm(x_dropped, weight.t(), out=h)
        _linear_fwd(x, weight, bias, u, lora_b, scale, y=y, dora_scale=c, h=h, x_dropped=x_dropped)
    return y, u, h, norm


def dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, u, h, norm, scale: float, dropout_p: float,
                    seed: int, compute_dx: bool, path: str):
    c = magnitude.float() / norm
    v, grad_b = lora_grad_shrink_bwd(grad_y, (lora_b.float() * c[:, None]).to(lora_b.dtype), u, scale,
                                     row_scale=c)  # v = (g ⊙ c)·B, dB = c ⊙ s·gᵀ·u
    grad_m = dora_magnitude_grad_bwd(grad_y, h, norm).to(magnitude.dtype)
    dx = aux = None
    if compute_dx and path == "hybrid":
        dx = torch.mm((grad_y * c).to(grad_y.dtype), weight)  # gc·W (gc is a transient M×N)
        if dropout_p > 0.0:
            aux = torch.mm(grad_y, weight)
    grad_x, grad_a = _linear_bwd(grad_y, weight, v, lora_a, x, scale, seed, dropout_p, dx=dx,
                                 compute_dx=compute_dx, dora_scale=c, aux=aux)
    return grad_x, grad_a, grad_b, grad_m

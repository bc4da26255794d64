"""The Triton backend: composes the kernels of :mod:`lora_kernels.kernels` into LoRA's forward
and backward, for the two paths of DESIGN.md §4.

- ``fused``:  y = [x·Wᵀ + b + s·u·Bᵀ] in one Triton GEMM;  dx = [g·W + s·(v·A)⊙Z] in one Triton GEMM.
- ``hybrid``: cuBLAS (torch.mm) for x·Wᵀ + b and g·W; Triton adds s·u·Bᵀ into y and s·(v·A)⊙Z into
  dx in place.

Both: u = (x⊙Z)·Aᵀ with Z made in registers; v = g·B; dB = s·gᵀ·u and dA = s·vᵀ·(x⊙Z) reduced in
a fixed order (deterministic). Same contract as :mod:`lora_kernels.torch_backend`.
"""
from __future__ import annotations

import torch

from .kernels.linear_bwd import lora_linear_bwd as _linear_bwd
from .kernels.linear_fwd import lora_linear_fwd as _linear_fwd
from .kernels.shrink import lora_b_grad_bwd, lora_shrink_bwd, lora_shrink_fwd

PATHS = ("fused", "hybrid")


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, seed: int, path: str):
    u = lora_shrink_fwd(x, lora_a, seed, dropout_p)
    if path == "fused":
        y = _linear_fwd(x, weight, bias, u, lora_b, scale)
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        _linear_fwd(x, weight, None, u, lora_b, scale, y=y)
    return y, u


def lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale: float, dropout_p: float, seed: int,
                    compute_dx: bool, path: str):
    v = lora_shrink_bwd(grad_y, lora_b)
    grad_b = lora_b_grad_bwd(grad_y, u, scale)
    dx = torch.mm(grad_y, weight) if (compute_dx and path == "hybrid") else None
    grad_x, grad_a = _linear_bwd(grad_y, weight, v, lora_a, x, scale, seed, dropout_p, dx=dx, compute_dx=compute_dx)
    return grad_x, grad_a, grad_b

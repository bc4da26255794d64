"""DoRA's row norm without building W + s·B·A (DESIGN.md §3).

    n_j² = ‖W_j‖² + 2s·⟨(W·Aᵀ)_j, B_j⟩ + s²·B_j·(A·Aᵀ)·B_jᵀ

computed in fp32 from ‖W_j‖² (N values; W is frozen, so callers may cache it), W·Aᵀ (N×r, fp32)
and the r×r Gram matrix A·Aᵀ. Nothing N×K is allocated: each backend computes W·Aᵀ its own way
(torch: row chunks; Triton: the shrink kernel with an fp32 output), this module does the rest.

Why the identity rather than streaming W + s·B·A tile by tile: both read W once and cost 2·N·K·r
flops, but the identity needs no extra kernel (W·Aᵀ is an existing thin GEMM), and ‖W_j‖² can be
cached across steps. Cancellation when W_j ≈ −s·(B·A)_j (n_j ≪ ‖W_j‖) costs relative accuracy
≈ eps32·‖W_j‖²/n_j²; n_j² is clamped at 0 before the square root.

Epsilon: n is clamped to at least ``DORA_EPS`` (1e-12), so an all-zero row (W_j = 0, B_j = 0) gives
c = m/n = 0/1e-12 = 0 and a finite output (PEFT divides 0 by 0 there and returns NaN).
"""
from __future__ import annotations

import torch

from .reference import DORA_EPS


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The norm is computed in fp32 (fp64 for fp64 weights, so the fp64 oracle stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W_j‖² (N,) in fp32 (fp64 for fp64 W), reduced without an fp32 copy of W."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=norm_dtype(weight.dtype)).square()


def weight_a_product_torch(weight: torch.Tensor, lora_a: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """W·Aᵀ (N×r) in fp32 (fp64 for fp64 W), upcasting W in row chunks (never an N×K fp32 copy)."""
    acc = norm_dtype(weight.dtype)
    a_t = lora_a.to(acc).t()
    if weight.dtype == acc:
        return weight @ a_t
    return torch.cat([weight[i:i + chunk_rows].to(acc) @ a_t for i in range(0, weight.shape[0], chunk_rows)])


def norm_from_products(w_sq: torch.Tensor, wa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scale: float, eps: float = DORA_EPS) -> torch.Tensor:
    """n (N,) from ‖W_j‖² and W·Aᵀ, in their dtype (fp32, or fp64 for the fp64 oracle)."""
    a32, b32 = lora_a.to(wa.dtype), lora_b.to(wa.dtype)
    gram = a32 @ a32.t()
    n_sq = w_sq + 2.0 * scale * (wa * b32).sum(1) + scale * scale * ((b32 @ gram) * b32).sum(1)
    return n_sq.clamp_min(0.0).sqrt().clamp_min(eps)

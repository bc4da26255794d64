"""DoRA's row norm without building W + s·B·A (DESIGN.md §3): the torch-backend version.

    n_j = max(‖W_j + s·(B·A)_j‖₂, eps)

streamed over blocks of rows: each block forms W_rows + s·B_rows·A in fp32 (rows × K, a bounded
transient, never N×K), squares and sums it. The Triton backend does the same tile by tile in
registers (``lora_kernels.kernels.dora``).

Why streaming rather than the low-rank identity n² = ‖W_j‖² + 2s·⟨(W·Aᵀ)_j, B_j⟩ + s²·B_j·(A·Aᵀ)·B_jᵀ:
both read W once and cost 2·N·K·r multiply-adds, so the identity saves nothing per step (A
changes every step, so W·Aᵀ must be recomputed even with ‖W_j‖² cached), but it cancels
catastrophically when n_j ≪ ‖W_j‖ (relative error ≈ eps32·‖W_j‖²/n_j²). The property tests found
such a row (K = 1, W_j ≈ −s·B_j·A, error 3e-3 in fp32); the streamed sum of squares has no
cancellation. The GPU cost of the two has not been measured side by side yet.

Epsilon: n is clamped to at least ``DORA_EPS`` (1e-12), so an all-zero row (W_j = 0, B_j = 0) gives
c = m/n = 0/1e-12 = 0 and a finite output (PEFT divides 0 by 0 there and returns NaN).
"""
from __future__ import annotations

import torch

from .reference import DORA_EPS


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The norm is accumulated in fp32 (fp64 for fp64 weights, so the fp64 oracle stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_weight_norm_torch(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                           eps: float = DORA_EPS, chunk_rows: int = 256) -> torch.Tensor:
    """n (N,) in fp32 (fp64 for fp64 W), streaming ``chunk_rows`` rows of W at a time."""
    acc = norm_dtype(weight.dtype)
    a = lora_a.detach().to(acc)
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for i in range(0, weight.shape[0], chunk_rows):
        rows = weight[i:i + chunk_rows].detach().to(acc)
        rows = rows.addmm(lora_b[i:i + chunk_rows].detach().to(acc), a, alpha=scale)
        out[i:i + chunk_rows] = torch.linalg.vector_norm(rows, dim=1)
    return out.clamp_min(eps)

"""The reference path: LoRA in plain, differentiable PyTorch. The oracle every kernel is tested against.

Shapes (DESIGN.md §1): x (..., K), weight W (N, K), bias b (N,) or None, lora_a A (r, K),
lora_b B (N, r), scale s (a float). The output has shape (..., N):

    y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ

Autograd provides the backward. Dropout uses :func:`lora_kernels.dropout.dropout_mask`, the same
seeded mask the kernels regenerate, so a kernel and this reference can be compared exactly. Note
that this naive path keeps the masked copy drop(x) alive for backward (that is what the fused path
avoids); its computation order is the unfused one frameworks use.
"""
from __future__ import annotations

import torch

from .dropout import dropout_mask


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ, with drop's mask a pure function of (seed, index, p).

    All tensors must share a dtype and device (cast before calling, e.g. to float64 for an oracle).
    """
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    y = x2d @ weight.t()
    if bias is not None:
        y = y + bias
    if dropout_p > 0.0:
        z = dropout_mask(seed, x2d.shape[0], k, dropout_p, dtype=x.dtype, device=x.device)
        xd = x2d * z
    else:
        xd = x2d
    y = y + scale * ((xd @ lora_a.t()) @ lora_b.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


# DoRA (DESIGN.md §3): y = m ⊙ (W + s·B·A)·x / ‖W + s·B·A‖_row, norm detached.
DORA_EPS = 1e-12  # row norms are clamped to at least this, so all-zero rows stay finite


def dora_weight_norm_ref(weight, lora_a, lora_b, scale: float, eps: float = DORA_EPS) -> torch.Tensor:
    """n_j = max(‖W_j + s·(B·A)_j‖₂, eps) over the K inputs of each output row (materialises W + s·B·A:
    fine for an oracle, never done by the library's paths)."""
    return torch.linalg.vector_norm(weight + scale * (lora_b @ lora_a), dim=1).clamp_min(eps)


def dora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    eps: float = DORA_EPS,
) -> torch.Tensor:
    """DoRA linear, exactly PEFT's definition (peft/tuners/lora/dora.py, variants.py).

    magnitude m: (N,). With c = m / n (n detached, see ``dora_weight_norm_ref``):
      dropout active (p > 0):  y = x·Wᵀ + b + (c − 1) ⊙ (xd·Wᵀ) + c ⊙ s·(xd·Aᵀ)·Bᵀ,  xd = x ⊙ Z
      otherwise:               y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b
    (the two agree when Z = 1).
    """
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    norm = dora_weight_norm_ref(weight, lora_a, lora_b, scale, eps).detach()
    c = magnitude / norm
    base = x2d @ weight.t()
    if dropout_p > 0.0:
        xd = x2d * dropout_mask(seed, x2d.shape[0], k, dropout_p, dtype=x.dtype, device=x.device)
        y = base + (c - 1) * (xd @ weight.t()) + c * (scale * ((xd @ lora_a.t()) @ lora_b.t()))
    else:
        y = c * (base + scale * ((x2d @ lora_a.t()) @ lora_b.t()))
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])

"""The functional API: ``lora_linear`` and ``dora_linear``."""
from __future__ import annotations

import torch

from . import functions  # noqa: F401  (registers the lora_kernels:: custom ops)
from ._validation import check_dora_inputs, check_dropout, check_lora_inputs, check_scale, check_seed
from .backends import resolve_backend
from .dropout import draw_seed


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ, forward and backward fused where a kernel exists.

    Args:
        x: (..., K) input, any leading dims and strides (viewed as M×K; a copy is made only when
            the leading dims cannot be flattened as a view).
        weight: (N, K) frozen weight; must have x's dtype. bias: (N,) or None.
        lora_a: (r, K); lora_b: (N, r). If their dtype (or bias's) differs from x's, e.g. fp32
            adapters with bf16 activations, they are cast to x's dtype for the computation
            (gradients flow back to them in their own dtype).
        scale: s, e.g. alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA).
        dropout_p: dropout probability on the adapter's input, in [0, 1); active only if training.
        seed: seed of the dropout mask; None draws one from torch's default generator (so runs
            are reproducible under torch.manual_seed). Same seed, same mask, on every backend.
        training: False disables dropout.
        backend: 'auto' | 'torch' | 'triton' | 'fused' | 'hybrid' (see lora_kernels.backends);
            None reads $LORA_KERNELS_BACKEND, else 'auto'.

    Returns:
        y of shape (..., N) and x's dtype.
    """
    x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = resolve_backend(backend, x2d, weight.shape[0], lora_a.shape[0])
    y, _ = torch.ops.lora_kernels.lora_linear_fwd(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _prepare(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training):
    """Validated arguments, adapters/bias in x's dtype, x viewed as M×K."""
    check_lora_inputs(x, weight, lora_a, lora_b, bias)
    scale = check_scale(scale)
    dropout_p = check_dropout(dropout_p) if training else 0.0
    if dropout_p > 0.0:
        seed = draw_seed() if seed is None else check_seed(seed)
    else:
        seed = 0 if seed is None else check_seed(seed)
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, bias, scale, dropout_p, seed


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """DoRA linear (PEFT's definition, DESIGN.md §3), forward and backward fused where a kernel exists.

    With n_j = ‖W_j + s·(B·A)_j‖₂ (detached, fp32, streamed: never materialising W + s·B·A) and c = m/n:
      training with dropout_p > 0:  y = x·Wᵀ + b + (c − 1) ⊙ (xd·Wᵀ) + c ⊙ s·(xd·Aᵀ)·Bᵀ
      otherwise:                    y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b

    Args are those of :func:`lora_linear`, plus ``magnitude`` m (N,), any floating dtype (the
    gradient dm comes back in it). The weight must not require grad.
    """
    check_dora_inputs(weight, magnitude)
    x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = resolve_backend(backend, x2d, weight.shape[0], lora_a.shape[0])
    y, _, _, _ = torch.ops.lora_kernels.dora_linear_fwd(
        x2d, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl)
    return y.reshape(*x.shape[:-1], weight.shape[0])

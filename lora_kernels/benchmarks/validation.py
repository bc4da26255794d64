"""Validation of a provider before it is timed: y and every gradient against an fp32 reference
(lora_kernels.reference) on the same inputs."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..reference import dora_linear_ref, lora_linear_ref
from .providers import FLOORS, SAME_MASK_PROVIDERS, SCALE, SEED, provider_fn
from .shapes import Shape


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom else num


def validate(provider: str, shape: Shape, problem, scale: float = SCALE,
             compile_backend: str = "inductor") -> dict[str, float]:
    """Normwise relative error of y and of every gradient against an fp32 reference on the same
    inputs (same mask for the floors and our providers; the others are validated with dropout off).
    On a 4-bit shape the reference runs on the dequantised weight (the problem's W)."""
    x, w, bias, a, b, grad, mag = problem
    p = shape.dropout_p if provider in SAME_MASK_PROVIDERS else 0.0
    made = provider_fn(provider, replace(shape, dropout_p=p), problem, scale, compile_backend)
    y = made.fn()
    grads = torch.autograd.grad(y, made.params, grad)
    leaves = [t.detach().float().requires_grad_(True) for t in (x, a, b) + ((mag,) if shape.dora else ())]
    w32, b32 = w.float(), bias.float()
    if provider in FLOORS:
        leaves = leaves[:1]
        ref = F.linear(leaves[0], w32, b32)
    elif shape.dora:
        ref = dora_linear_ref(leaves[0], w32, leaves[1], leaves[2], leaves[3], scale, b32, p, SEED)
    else:
        ref = lora_linear_ref(leaves[0], w32, leaves[1], leaves[2], scale, b32, p, SEED)
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    errors = {"y": _rel(y, ref)}
    for name, g_out, g_ref in zip(made.grad_names, grads, ref_grads):
        errors[name] = _rel(g_out, g_ref)
    return errors


VALIDATION_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2, "float64": 1e-8}

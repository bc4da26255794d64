"""Comparing a LoRA path with the float64 reference: the tolerance table and the harness shared by
the test suite and ``lora-kernels check``.

Error measure (DESIGN.md §7): ‖out − ref‖ / ‖ref‖ against a float64 reference computed from the
same (already rounded) inputs and the same dropout mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import dora_linear, lora_linear
from .reference import dora_linear_ref, dora_weight_norm_ref, lora_linear_ref

# Normwise relative tolerance per compute dtype. float32 assumes tf32 off. The half-precision
# figures allow for the output rounding plus the rounding of the rank-r intermediates (u, v).
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}

QUANTITIES = ("y", "dx", "dA", "dB", "dm", "db")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN if out has NaNs where ref does not)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


@dataclass
class LoraCase:
    """One comparison: shapes, dtype, dropout, and how x is laid out."""

    m: int
    n: int
    k: int
    r: int
    dtype: torch.dtype = torch.float32
    dropout_p: float = 0.0
    bias: bool = True
    batch: int | None = None  # if set, x is (batch, m, k) instead of (m, k)
    noncontiguous: bool = False  # x is a transposed view (stride along K != 1)
    seed: int = 1234
    scale: float = 2.0
    dora: bool = False  # DoRA (a magnitude vector m is drawn too) instead of LoRA

    def __str__(self) -> str:
        lead = f"{self.batch}x{self.m}" if self.batch else f"{self.m}"
        extras = ("+bias" if self.bias else "") + (" nc" if self.noncontiguous else "")
        kind = "DoRA " if self.dora else ""
        return f"{kind}M={lead} N={self.n} K={self.k} r={self.r} {str(self.dtype)[6:]} p={self.dropout_p}{extras}"


def make_inputs(case: LoraCase, device="cpu", generator: torch.Generator | None = None):
    """Fresh random inputs (no zeros: B is random too, unlike at init) in the case's dtype:
    (x, weight, lora_a, lora_b, bias, grad_y, magnitude); magnitude is None unless case.dora."""
    g = generator or torch.Generator().manual_seed(case.seed)
    lead = (case.batch, case.m) if case.batch else (case.m,)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(case.dtype).to(device)

    if case.noncontiguous:  # same logical values, K-major storage
        x = rnd(*lead[:-1], case.k, lead[-1]).transpose(-1, -2)
    else:
        x = rnd(*lead, case.k)
    weight = rnd(case.n, case.k, std=case.k ** -0.5)
    lora_a = rnd(case.r, case.k, std=case.k ** -0.5)
    lora_b = rnd(case.n, case.r, std=case.r ** -0.5)
    bias = rnd(case.n) if case.bias else None
    grad_y = rnd(*lead, case.n)
    magnitude = None
    if case.dora:  # m = n·(1 + U[0, 0.3)): away from the init m = n, so dm and c − 1 matter
        norm = dora_weight_norm_ref(weight.double().cpu(), lora_a.double().cpu(), lora_b.double().cpu(), case.scale)
        magnitude = (norm * (1 + 0.3 * torch.rand(case.n, generator=g, dtype=torch.float64))).to(case.dtype).to(device)
    return x, weight, lora_a, lora_b, bias, grad_y, magnitude


def _leaves(case, x, lora_a, lora_b, bias, magnitude):
    leaves = {"dx": x.detach().clone(), "dA": lora_a.detach().clone(), "dB": lora_b.detach().clone()}
    if case.noncontiguous:
        leaves["dx"] = x.detach().transpose(-1, -2).clone().transpose(-1, -2)
    if magnitude is not None:
        leaves["dm"] = magnitude.detach().clone()
    if bias is not None:
        leaves["db"] = bias.detach().clone()
    for t in leaves.values():
        t.requires_grad_(True)
    return leaves


def run_path(backend: str, case: LoraCase, inputs, poison: bool = True) -> dict[str, torch.Tensor]:
    """y and every gradient from ``lora_linear`` (or ``dora_linear``) on ``backend``.

    With ``poison``, each gradient is copied into a fresh buffer of its shape (NaN-filled, then
    overwritten by the copy): the returned gradients own their memory and have ``empty_like``'s
    strides. This does not poison the kernels' own output buffers; an element a kernel never wrote
    holds whatever its ``torch.empty`` buffer held. Real output poisoning: run under
    :func:`lora_kernels.checks.base.nan_empty` (every ``torch.empty``-family buffer starts NaN), as
    ``lora-kernels check`` does.
    """
    x, weight, lora_a, lora_b, bias, grad_y, magnitude = inputs
    leaves = _leaves(case, x, lora_a, lora_b, bias, magnitude)
    common = dict(bias=leaves.get("db"), dropout_p=case.dropout_p, seed=case.seed, backend=backend)
    if case.dora:
        y = dora_linear(leaves["dx"], weight, leaves["dA"], leaves["dB"], leaves["dm"], case.scale, **common)
    else:
        y = lora_linear(leaves["dx"], weight, leaves["dA"], leaves["dB"], case.scale, **common)
    out = {"y": y.detach()}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    for name, grad in zip(leaves, grads):
        if poison:
            buf = torch.full_like(grad, float("nan"))
            buf.copy_(grad)
            grad = buf
        out[name] = grad
    return out


def run_reference(case: LoraCase, inputs) -> dict[str, torch.Tensor]:
    """The float64 reference on the same (rounded) inputs and the same mask."""
    x, weight, lora_a, lora_b, bias, grad_y, magnitude = (
        t.detach().double().cpu() if t is not None else None for t in inputs)
    leaves = _leaves(case, x, lora_a, lora_b, bias, magnitude)
    if case.dora:
        y = dora_linear_ref(leaves["dx"], weight, leaves["dA"], leaves["dB"], leaves["dm"], case.scale,
                            bias=leaves.get("db"), dropout_p=case.dropout_p, seed=case.seed)
    else:
        y = lora_linear_ref(leaves["dx"], weight, leaves["dA"], leaves["dB"], case.scale, bias=leaves.get("db"),
                            dropout_p=case.dropout_p, seed=case.seed)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return {"y": y.detach(), **dict(zip(leaves, grads))}


def compare(backend: str, case: LoraCase, device="cpu", relative_to_terms: bool = False) -> dict[str, float]:
    """Relative error of each quantity of ``backend`` against the float64 reference.

    ``relative_to_terms`` divides by the norm of the reference evaluated on |inputs| (the size of
    the terms being summed) instead of the result's own norm. Use it where sums can cancel almost
    completely (tiny reduction lengths): there, rounding the rank-r intermediates to fp16/bf16
    (as every framework does) is unavoidably large relative to the result, not to the terms.
    """
    inputs = make_inputs(case, device)
    out = run_path(backend, case, inputs)
    ref = run_reference(case, inputs)
    if not relative_to_terms:
        return {q: rel_error(out[q].cpu(), ref[q]) for q in ref}
    absolute = [t.detach().double().cpu().abs() if t is not None else None for t in inputs]
    if case.dora:  # keep |c| = |m|/n: the norm of |W| + s·|B|·|A| does not cancel like the real one
        x, weight, lora_a, lora_b, bias, grad_y, magnitude = (t.detach().double().cpu() if t is not None else None
                                                              for t in inputs)
        n_real = dora_weight_norm_ref(weight, lora_a, lora_b, case.scale)
        n_abs = dora_weight_norm_ref(absolute[1], absolute[2], absolute[3], case.scale)
        absolute[6] = magnitude.abs() * n_abs / n_real
    terms = run_reference(case, tuple(absolute))
    if case.dora:  # dm = Σ g ⊙ h / n divides by the real n
        terms["dm"] = terms["dm"] * n_abs / n_real
    return {q: (out[q].cpu().double() - ref[q]).norm().item() / max(terms[q].norm().item(), 1e-300) for q in ref}

"""Comparing a LoRA path with the float64 reference: the tolerance table and the harness shared by
the test suite and ``lora-kernels check``.

Error measure (DESIGN.md §7): ‖out − ref‖ / ‖ref‖ against a float64 reference computed from the
same (already rounded) inputs and the same dropout mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import lora_linear
from .reference import lora_linear_ref

# Normwise relative tolerance per compute dtype. float32 assumes tf32 off. The half-precision
# figures allow for the output rounding plus the rounding of the rank-r intermediates (u, v).
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}

QUANTITIES = ("y", "dx", "dA", "dB", "db")


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

    def __str__(self) -> str:
        lead = f"{self.batch}x{self.m}" if self.batch else f"{self.m}"
        extras = ("+bias" if self.bias else "") + (" nc" if self.noncontiguous else "")
        return f"M={lead} N={self.n} K={self.k} r={self.r} {str(self.dtype)[6:]} p={self.dropout_p}{extras}"


def make_inputs(case: LoraCase, device="cpu", generator: torch.Generator | None = None):
    """Fresh random inputs (no zeros: B is random too, unlike at init) in the case's dtype."""
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
    return x, weight, lora_a, lora_b, bias, grad_y


def run_path(backend: str, case: LoraCase, inputs, poison: bool = True) -> dict[str, torch.Tensor]:
    """y and every gradient from ``lora_linear`` on ``backend``.

    With ``poison``, each gradient buffer starts NaN-filled (accumulated into by autograd), so any
    element a kernel did not write shows up as NaN.
    """
    x, weight, lora_a, lora_b, bias, grad_y = inputs
    leaves = {"dx": x.detach().clone(), "dA": lora_a.detach().clone(), "dB": lora_b.detach().clone()}
    if bias is not None:
        leaves["db"] = bias.detach().clone()
    if case.noncontiguous:
        leaves["dx"] = x.detach().transpose(-1, -2).clone().transpose(-1, -2)
    for t in leaves.values():
        t.requires_grad_(True)
    y = lora_linear(leaves["dx"], weight, leaves["dA"], leaves["dB"], case.scale, bias=leaves.get("db"),
                    dropout_p=case.dropout_p, seed=case.seed, backend=backend)
    out = {"y": y.detach()}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    for name, grad in zip(leaves, grads):
        if poison:  # a kernel that skipped elements would leave these NaN
            buf = torch.full_like(grad, float("nan"))
            buf.copy_(grad)
            grad = buf
        out[name] = grad
    return out


def run_reference(case: LoraCase, inputs) -> dict[str, torch.Tensor]:
    """The float64 reference on the same (rounded) inputs and the same mask."""
    x, weight, lora_a, lora_b, bias, grad_y = (t.detach().double().cpu() if t is not None else None for t in inputs)
    leaves = {"dx": x, "dA": lora_a, "dB": lora_b}
    if bias is not None:
        leaves["db"] = bias
    for t in leaves.values():
        t.requires_grad_(True)
    y = lora_linear_ref(x, weight, lora_a, lora_b, case.scale, bias=leaves.get("db"),
                        dropout_p=case.dropout_p, seed=case.seed)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return {"y": y.detach(), **dict(zip(leaves, grads))}


def compare(backend: str, case: LoraCase, device="cpu") -> dict[str, float]:
    """Relative error of each quantity of ``backend`` against the float64 reference."""
    inputs = make_inputs(case, device)
    out = run_path(backend, case, inputs)
    ref = run_reference(case, inputs)
    return {q: rel_error(out[q].cpu(), ref[q]) for q in ref}

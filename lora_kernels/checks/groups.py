"""Family ``groups``: shared-input projection groups (:func:`lora_kernels.grouped.grouped_lora`: one
grouped shrink launch per forward on the Triton backends), 2 and 3 members with their own N, rank,
scale, bias and dropout seed.

Each member's y_i and every gradient (dx accumulated over the members, dA_i, dB_i, db_i) against
the float64 reference (``lora_linear_ref`` per member on the same rounded inputs and masks), and,
as quantity ``sep``, the largest error of the group's outputs and gradients against separate
``lora_linear`` calls on the same backend (same maths, same masks; only rounding order may differ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..functional import lora_linear
from ..grouped import grouped_lora
from ..reference import lora_linear_ref
from ..testing import rel_error
from .base import Family, errors, leaf, randn

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class GroupCase:
    m: int
    k: int
    ns: tuple[int, ...]  # each member's N
    ranks: tuple[int, ...]
    dtype: torch.dtype = f32
    dropout_p: float = 0.0
    biases: tuple[bool, ...] = ()  # default: every member has a bias
    batch: int | None = None  # x is (batch, m, k)
    seed: int = 777

    def __str__(self) -> str:
        lead = f"{self.batch}x{self.m}" if self.batch else f"{self.m}"
        bias = "".join("b" if b else "-" for b in self._biases())
        return (f"{len(self.ns)} members M={lead} N={'/'.join(map(str, self.ns))} K={self.k} "
                f"r={'/'.join(map(str, self.ranks))} {str(self.dtype)[6:]} p={self.dropout_p} bias={bias}")

    def _biases(self) -> tuple[bool, ...]:
        return self.biases or (True,) * len(self.ns)


SCALES = (2.0, 0.5, 1.25)
SEEDS = (11, 2**40 + 3, 2**62 + 5)

# K not a multiple of 16, odd ranks, M not a multiple of the blocks, 3-D x, bias on some members only.
SMALL_GRID = [
    GroupCase(37, 40, (24, 8, 16), (3, 5, 7), f32, 0.0, (True, False, True)),
    GroupCase(13, 64, (48, 20), (16, 5), bf16, 0.25, (False, True), batch=3),
    GroupCase(41, 72, (40, 24, 24), (8, 8, 8), f16, 0.1),
    GroupCase(30, 50, (33, 17), (12, 1), f32, 0.5, (False, False)),
]

QUICK_GRID = [SMALL_GRID[0], SMALL_GRID[1]]

# On a GPU: Llama-3-8B q/k/v (N 4096/1024/1024) and gate/up (N 14336 x 2), several tiles everywhere
# (two small cases only: each new shape compiles and autotunes the members' fused GEMMs afresh).
GPU_GRID = SMALL_GRID[:2] + [
    GroupCase(777, 1300, (1100, 300, 300), (16, 8, 64), f16, 0.1),
    GroupCase(2048, 4096, (4096, 1024, 1024), (16, 16, 16), bf16, 0.1, (False, False, False)),
    GroupCase(1024, 4096, (14336, 14336), (16, 16), bf16, 0.0, (False, False)),
]

LEGEND = (
    "case: members, M tokens (BxM: x is 3-D), N of each member, K inputs, r of each member, dtype, p dropout",
    "      (shared; a seed per member), bias: b/- per member. qty: y<i>, the gradient dx, dA<i>, dB<i>, db<i>,",
    "      or sep: the largest error against separate lora_linear calls on the same backend",
)


def _leaves(x, biases, lora_as, lora_bs):
    out = {"dx": leaf(x)}
    out.update({f"dA{i}": leaf(a) for i, a in enumerate(lora_as)})
    out.update({f"dB{i}": leaf(b) for i, b in enumerate(lora_bs)})
    out.update({f"db{i}": leaf(b) for i, b in enumerate(biases) if b is not None})
    return out


def _run(case, inputs, member_fn=None, backend=None):
    """y_i and every gradient: grouped_lora (member_fn None), else one member_fn call per member."""
    x, weights, biases, lora_as, lora_bs, grad_ys = inputs
    lv = _leaves(x, biases, lora_as, lora_bs)
    n = len(weights)
    a_s, b_s = [lv[f"dA{i}"] for i in range(n)], [lv[f"dB{i}"] for i in range(n)]
    bs = [lv.get(f"db{i}") for i in range(n)]
    scales, seeds = list(SCALES[:n]), list(SEEDS[:n])
    if member_fn is None:
        ys = grouped_lora(lv["dx"], weights, bs, a_s, b_s, scales, case.dropout_p, seeds, backend=backend)
    else:
        ys = [member_fn(lv["dx"], w, a, b, s, bias=bias, dropout_p=case.dropout_p, seed=seed)
              for w, bias, a, b, s, seed in zip(weights, bs, a_s, b_s, scales, seeds)]
    return {**{f"y{i}": y.detach() for i, y in enumerate(ys)}, **dict(zip(lv, torch.autograd.grad(ys, list(lv.values()), grad_ys)))}


def prepare(case: GroupCase, device: str):
    rnd = randn(torch.Generator().manual_seed(case.seed), case.dtype, device)
    lead = (case.batch, case.m) if case.batch else (case.m,)
    x = rnd(*lead, case.k)
    weights = [rnd(n, case.k, std=case.k ** -0.5) for n in case.ns]
    biases = [rnd(n) if has else None for n, has in zip(case.ns, case._biases())]
    lora_as = [rnd(r, case.k, std=case.k ** -0.5) for r in case.ranks]
    lora_bs = [rnd(n, r, std=r ** -0.5) for n, r in zip(case.ns, case.ranks)]
    grad_ys = [rnd(*lead, n) for n in case.ns]
    inputs = (x, weights, biases, lora_as, lora_bs, grad_ys)

    def f64(t):
        return [f64(u) for u in t] if isinstance(t, list) else (None if t is None else t.double())

    return inputs, _run(case, [f64(t) for t in inputs], member_fn=lora_linear_ref)


def run(path: str, case: GroupCase, prepared, device: str) -> dict[str, float]:
    inputs, ref = prepared
    out = _run(case, inputs, backend=path)
    separate = _run(case, inputs, member_fn=lambda *a, **kw: lora_linear(*a, backend=path, **kw))
    result = errors(out, ref)
    result["sep"] = max((rel_error(out[q].cpu(), separate[q].cpu()) for q in out), key=lambda e: (e != e, e))
    return result


FAMILY = Family(
    name="groups",
    title="projection groups (grouped_lora): each member's y and every gradient",
    legend=LEGEND,
    grids={"quick": QUICK_GRID, "small": SMALL_GRID, "gpu": GPU_GRID},
    kernel_paths=("fused", "hybrid"),
    prepare=prepare,
    run=run,
)

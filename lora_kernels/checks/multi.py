"""Family ``multi``: several adapters on one layer (``multi_adapter_linear``), on the torch path and on
the multi-adapter kernels (``triton``: one segmented shrink + one expand launch, and one launch each
for dA and dB in the backward), against the float64 oracles of :mod:`lora_kernels.multi.reference`.

Two modes: ``rows`` (a mixed batch: row m through adapter row_adapter[m], −1 = the base layer only;
every adapter and the base appear) and ``active`` (every row through the listed adapters, applied in
an order that is not their storage order). Adapters differ in rank and scale. LoRA cases check y and
the gradients dx, db, dA_i, dB_i (training, with each adapter's own dropout seed); cases with DoRA
adapters check y only (the kernels serve DoRA in inference; DoRA trains on the torch path, which
``tests/test_multi_adapter.py`` covers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..multi import AdapterSpec, multi_adapter_linear
from ..multi.reference import active_adapters_ref, mixed_batch_ref
from ..reference import dora_weight_norm_ref
from .base import Family, errors, leaf, randn

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class MultiCase:
    mode: str  # "rows" (mixed batch) or "active" (several active adapters, in order)
    m: int
    n: int
    k: int
    ranks: tuple[int, ...]
    dtype: torch.dtype = f32
    dropout_p: float = 0.0  # every adapter's (training when > 0)
    dora: tuple[int, ...] = ()  # indices of the DoRA adapters (then y only)
    bias: bool = True
    seed: int = 4242

    @property
    def grad(self) -> bool:
        return not self.dora

    def __str__(self) -> str:
        dora = f" DoRA@{','.join(map(str, self.dora))}" if self.dora else ""
        return (f"{self.mode} r={'/'.join(map(str, self.ranks))}{dora} M={self.m} N={self.n} K={self.k} "
                f"{str(self.dtype)[6:]} p={self.dropout_p}{'+bias' if self.bias else ''}")


# N, K not multiples of the blocks; ranks 1 to 64 side by side; both modes; every dtype.
SMALL_GRID = [
    MultiCase("rows", 45, 72, 40, (1, 8, 12, 16), f32, 0.0),
    MultiCase("rows", 41, 24, 70, (3, 8, 5), bf16, 0.2, bias=False),
    MultiCase("active", 37, 40, 48, (8, 4, 12), f16, 0.1),
    MultiCase("active", 29, 33, 65, (16, 2), f32, 0.0),
    MultiCase("rows", 39, 72, 40, (4, 16, 2), f16, 0.0, dora=(2,)),
    MultiCase("active", 30, 40, 48, (8, 4, 12), bf16, 0.0, dora=(0, 2)),
    MultiCase("rows", 70, 65, 90, (64, 2, 8, 16, 4), f32, 0.1),
]

QUICK_GRID = [SMALL_GRID[1], SMALL_GRID[5]]

# On a GPU: more rows than one block per adapter, many adapters, rank 64, and Llama-sized q/o projections.
GPU_GRID = SMALL_GRID + [
    MultiCase("rows", 1000, 1100, 1300, (16, 8, 64, 4, 32, 12, 16, 8), bf16, 0.1),
    MultiCase("active", 777, 768, 1024, (16, 64, 8), f16, 0.1),
    MultiCase("rows", 512, 4096, 4096, (16, 16, 8, 64), bf16, 0.1),
    MultiCase("active", 256, 4096, 4096, (16, 8), bf16, 0.0, dora=(1,)),
]

LEGEND = (
    "case: rows: a mixed batch (row m through adapter row_adapter[m], some rows through none); active: every",
    "      row through the adapters in turn; r: the adapters' ranks; DoRA@i: adapter i is DoRA (then y only);",
    "      M rows, N outputs, K inputs, dtype, p dropout (training, a seed per adapter); +bias.",
    "qty: y, or the gradient dx, db, dA<i>, dB<i> (adapter i); reference: lora_kernels.multi.reference",
)


def _adapters(case, lora_as, lora_bs, mags):
    return [AdapterSpec(f"a{i}", a, (lambda b=b: b), 0.5 + 0.25 * i, case.dropout_p, mag,
                        tuple(t for t in (a, b, mag) if t is not None))
            for i, (a, b, mag) in enumerate(zip(lora_as, lora_bs, mags))]


def _forward(case, fn, x, weight, bias, lora_as, lora_bs, mags, grad_y, selection):
    """y and (LoRA cases) the gradients of x, the bias and every adapter's A and B."""
    leaves = {"dx": leaf(x)}
    if bias is not None:
        leaves["db"] = leaf(bias)
    if case.grad:
        a_leaves, b_leaves = [leaf(a) for a in lora_as], [leaf(b) for b in lora_bs]
        leaves.update({f"dA{i}": a for i, a in enumerate(a_leaves)})
        leaves.update({f"dB{i}": b for i, b in enumerate(b_leaves)})
        adapters = _adapters(case, a_leaves, b_leaves, mags)
        y = fn(leaves["dx"], weight, leaves.get("db"), adapters, **selection)
        return {"y": y.detach(), **dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad_y)))}
    with torch.no_grad():
        y = fn(x, weight, bias, _adapters(case, lora_as, lora_bs, mags), **selection)
    return {"y": y}


def prepare(case: MultiCase, device: str):
    g = torch.Generator().manual_seed(case.seed)
    rnd = randn(g, case.dtype, device)
    x, weight = rnd(case.m, case.k), rnd(case.n, case.k, std=case.k ** -0.5)
    bias = rnd(case.n) if case.bias else None
    lora_as = [rnd(r, case.k, std=case.k ** -0.5) for r in case.ranks]
    lora_bs = [rnd(case.n, r, std=r ** -0.5) for r in case.ranks]
    mags = []
    for i, (a, b) in enumerate(zip(lora_as, lora_bs)):  # DoRA: m = n·(1 + U[0, 0.3)), away from the init m = n
        if i in case.dora:
            norm = dora_weight_norm_ref(weight.double(), a.double(), b.double(), 0.5 + 0.25 * i)
            mags.append((norm * (1 + 0.3 * torch.rand(case.n, generator=g, dtype=torch.float64).to(device)))
                        .to(case.dtype))
        else:
            mags.append(None)
    grad_y = rnd(case.m, case.n)
    n = len(case.ranks)
    if case.mode == "rows":
        rows = torch.randint(-1, n, (case.m,), generator=g)
        rows[:n + 1] = torch.arange(-1, n)  # every adapter and the base layer present
        selection = {"row_adapter": rows.to(device)}
        oracle = mixed_batch_ref
    else:
        selection = {"active": list(range(n))[::-1]}
        oracle = active_adapters_ref
    training = case.dropout_p > 0
    seeds = [2**40 + 977 * i + case.seed for i in range(n)]
    selection.update(training=training, seeds=seeds)
    inputs = (x, weight, bias, lora_as, lora_bs, mags, grad_y, selection)
    f64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs[:3]]
    f64 += [[None if t is None else t.double() for t in ts] for ts in inputs[3:6]] + [grad_y.double()]
    ref = _forward(case, oracle, *f64, selection)
    return inputs, ref


def run(path: str, case: MultiCase, prepared, device: str) -> dict[str, float]:
    inputs, ref = prepared
    *tensors, selection = inputs

    def fn(*args, **kw):
        return multi_adapter_linear(*args, backend=path, **kw)

    return errors(_forward(case, fn, *tensors, selection), ref)


FAMILY = Family(
    name="multi",
    title="several adapters (multi_adapter_linear): mixed batches and several active adapters, y and gradients",
    legend=LEGEND,
    grids={"quick": QUICK_GRID, "small": SMALL_GRID, "gpu": GPU_GRID},
    kernel_paths=("triton",),
    prepare=prepare,
    run=run,
)

"""LoRA linear microbenchmarks: our paths against the frozen floor and the unfused eager path.

Providers (each validated once against the reference before it is timed):
    base     F.linear(x, W, b) alone, the physical floor (forward, and dx in backward)
    unfused  the strongest eager path: cuBLAS x·Wᵀ + b, nn.functional.dropout, then
             y.addmm_((drop(x)·Aᵀ), Bᵀ, alpha=s) in place (what Unsloth-style code does);
             LoRA only — for DoRA the eager baseline is PEFT's layer
    peft     PEFT's lora.Linear (use_dora for DoRA shapes), when peft is installed
    torch    lora_kernels, torch backend
    fused    lora_kernels, Triton fused path
    hybrid   lora_kernels, Triton hybrid path (cuBLAS GEMMs + Triton LoRA kernels)

Modes: fwd, bwd (backward only, graph retained), fwdbwd. Figures per row: median time and the
20th/80th percentiles, TFLOP/s, peak memory of fwd+bwd, and bytes saved for backward beyond x and
the parameters (exact, from saved_tensors_hooks; meaningful on CPU too).

CPU timings say nothing about GPU speed; on CPU this module is only exercised for correctness of
the harness (tests/test_bench.py) and for the saved-bytes figures.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from lora_kernels import dora_linear, dora_linear_ref, lora_linear, lora_linear_ref
from lora_kernels.reference import dora_weight_norm_ref

LLAMA3_8B_PROJECTIONS = {  # (in_features K, out_features N)
    "q/o 4096→4096": (4096, 4096),
    "k/v 4096→1024": (4096, 1024),
    "gate/up 4096→14336": (4096, 14336),
    "down 14336→4096": (14336, 4096),
}
OUR_PROVIDERS = ("torch", "fused", "hybrid")


@dataclass
class Shape:
    name: str
    m: int
    k: int
    n: int
    r: int
    dropout_p: float
    dtype: str = "bfloat16"
    dora: bool = False

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def flops(self, mode: str) -> float:
        m, n, k, r = self.m, self.n, self.k, self.r
        fwd = 2 * m * n * k + 2 * m * r * (k + n)
        bwd = 2 * m * n * k + 4 * m * r * (k + n)  # dx GEMM; v, dB, dA, v·A (no dW: W is frozen)
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


@dataclass
class Row:
    shape: dict
    provider: str
    mode: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    tflops: float
    peak_mem_mb: float | None = None
    saved_bytes: int | None = None
    extra: dict = field(default_factory=dict)


def default_shapes(tokens=(2048, 8192, 16384), ranks=(16,), dropouts=(0.0, 0.1), extra_ranks=(8, 64)):
    shapes = []
    for name, (k, n) in LLAMA3_8B_PROJECTIONS.items():
        for m in tokens:
            for p in dropouts:
                for r in ranks:
                    shapes.append(Shape(name, m, k, n, r, p))
    # the rank sweep at one token count
    for name, (k, n) in LLAMA3_8B_PROJECTIONS.items():
        for r in extra_ranks:
            shapes.append(Shape(name, tokens[len(tokens) // 2], k, n, r, 0.1))
    # DoRA at r = 16, both dropout settings, one token count
    for name, (k, n) in LLAMA3_8B_PROJECTIONS.items():
        for p in dropouts:
            shapes.append(Shape(name, tokens[len(tokens) // 2], k, n, ranks[0], p, dora=True))
    return shapes


def make_problem(shape: Shape, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dt)

    x = rnd(shape.m, shape.k).requires_grad_(True)
    w = rnd(shape.n, shape.k, std=shape.k ** -0.5)
    bias = rnd(shape.n)
    a = rnd(shape.r, shape.k, std=shape.k ** -0.5).requires_grad_(True)
    b = rnd(shape.n, shape.r, std=shape.r ** -0.5).requires_grad_(True)
    grad = rnd(shape.m, shape.n)
    mag = None
    if shape.dora:
        mag = (dora_weight_norm_ref(w.float(), a.detach().float(), b.detach().float(), 2.0) * 1.1).to(dt)
        mag.requires_grad_(True)
    return x, w, bias, a, b, grad, mag


def provider_fn(provider: str, shape: Shape, problem, scale: float = 2.0):
    """(zero-argument callable computing y, tensors to differentiate) for ``provider``, or None."""
    x, w, bias, a, b, _, mag = problem
    p = shape.dropout_p
    if provider == "base":
        return (lambda: F.linear(x, w, bias)), [x]
    if provider == "unfused" and shape.dora:
        return None  # for DoRA the eager baseline is PEFT's layer
    if provider == "unfused":
        def unfused():
            y = F.linear(x, w, bias)
            xd = F.dropout(x, p, training=True) if p > 0 else x
            return y.addmm_(xd @ a.t(), b.t(), alpha=scale)
        return unfused, [x, a, b]
    if provider == "peft":
        try:
            import peft
        except ImportError:
            return None

        class _One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(shape.k, shape.n, device=x.device, dtype=x.dtype)

            def forward(self, inp):
                return self.proj(inp)

        model = _One()
        with torch.no_grad():
            model.proj.weight.copy_(w)
            model.proj.bias.copy_(bias)
        cfg = peft.LoraConfig(r=shape.r, lora_alpha=scale * shape.r, lora_dropout=p, target_modules=["proj"],
                              use_dora=shape.dora)
        model = peft.get_peft_model(model, cfg)  # PEFT's defaults (it may keep adapters in fp32)
        layer = model.base_model.model.proj
        trainable = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if shape.dora:
                layer.lora_magnitude_vector["default"].weight.copy_(mag)
                trainable.append(layer.lora_magnitude_vector["default"].weight)
        model.train()
        return (lambda: layer(x)), trainable
    if provider in OUR_PROVIDERS and shape.dora:
        return (lambda: dora_linear(x, w, a, b, mag, scale, bias=bias, dropout_p=p, seed=1234,
                                    backend=provider)), [x, a, b, mag]
    if provider in OUR_PROVIDERS:
        return (lambda: lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, seed=1234, backend=provider)), [x, a, b]
    raise ValueError(f"unknown provider {provider!r}")


def validate(provider: str, shape: Shape, problem, scale: float = 2.0) -> float:
    """Normwise relative error of y against the fp32 reference (same mask for our providers;
    other providers draw their own masks, so they are validated with dropout off)."""
    x, w, bias, a, b, _, mag = problem
    p = shape.dropout_p if provider in OUR_PROVIDERS else 0.0
    vshape = Shape(**{**asdict(shape), "dropout_p": p})
    fn, _ = provider_fn(provider, vshape, problem, scale)
    with torch.no_grad():
        y = fn().float()
        if provider == "base":
            ref = F.linear(x.float(), w.float(), bias.float())
        elif shape.dora:
            ref = dora_linear_ref(x.float(), w.float(), a.float(), b.float(), mag.float(), scale, bias.float(), p,
                                  1234)
        else:
            ref = lora_linear_ref(x.float(), w.float(), a.float(), b.float(), scale, bias.float(), p, 1234)
    return ((y - ref).norm() / ref.norm()).item()


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        def bench(fn):
            q = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
            return tuple(q)
        return bench

    def bench_cpu(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]
    return bench_cpu


def saved_bytes(fn, known: set[int]) -> int:
    """Bytes saved for backward by one forward, beyond tensors in ``known`` (x and parameters)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        key = (t.data_ptr(), t.numel())
        if t.data_ptr() in known or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def run_shape(shape: Shape, providers, device: str, modes=("fwd", "bwd", "fwdbwd"), tol: float = 3e-2):
    """Rows for one shape; a provider that fails validation is reported, not timed."""
    problem = make_problem(shape, device)
    x, w, bias, a, b, grad, mag = problem
    known = {x.data_ptr(), w.data_ptr(), bias.data_ptr(), a.data_ptr(), b.data_ptr()}
    if mag is not None:
        known.add(mag.data_ptr())
    bench = _timer(device)
    rows = []
    for provider in providers:
        made = provider_fn(provider, shape, problem)
        if made is None:
            continue
        fn, params = made
        err = validate(provider, shape, problem)
        if not err <= tol:
            rows.append(Row(asdict(shape), provider, "invalid", float("nan"), float("nan"), float("nan"),
                            float("nan"), extra={"rel_err": err}))
            continue
        for mode in modes:
            if mode == "fwd":
                with torch.no_grad():
                    q = bench(fn)
            elif mode == "bwd":
                y = fn()
                q = bench(lambda: torch.autograd.grad(y, params, grad, retain_graph=True))
                del y
            else:
                q = bench(lambda: torch.autograd.grad(fn(), params, grad))
            rows.append(Row(asdict(shape), provider, mode, q[0], q[1], q[2],
                            shape.flops(mode) / (q[0] * 1e-3) / 1e12, extra={"rel_err": err}))
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            torch.autograd.grad(fn(), params, grad)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        rows[-1].peak_mem_mb = peak
        rows[-1].saved_bytes = saved_bytes(fn, known)
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown_table(rows: list[Row]) -> str:
    """One line per shape: fwd+bwd median per provider, and the key ratios."""
    by_shape: dict[str, dict[str, Row]] = {}
    order = []
    for row in rows:
        if row.mode not in ("fwdbwd", "invalid"):
            continue
        s = row.shape
        kind = "DoRA" if s.get("dora") else "LoRA"
        key = f"{kind} | {s['name']} | {s['m']} | {s['r']} | {s['dropout_p']} | {s['dtype']}"
        if key not in by_shape:
            by_shape[key] = {}
            order.append(key)
        by_shape[key][row.provider] = row
    providers = [p for p in ("base", "unfused", "peft", "torch", "fused", "hybrid")
                 if any(p in d for d in by_shape.values())]
    head = "| kind | projection | tokens | r | p | dtype | " + " | ".join(f"{p} ms" for p in providers)
    head += " | best ours / base | eager / best ours | saved for bwd: ours / eager |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in order:
        d = by_shape[key]
        cells = []
        for p in providers:
            r = d.get(p)
            cells.append("invalid" if r is not None and r.mode == "invalid" else (f"{r.ms_median:.3f}" if r else "-"))
        ours = [d[p] for p in ("fused", "hybrid") if p in d and d[p].mode == "fwdbwd"] or \
               [d[p] for p in ("torch",) if p in d and d[p].mode == "fwdbwd"]
        best = min(ours, key=lambda r: r.ms_median) if ours else None
        base, unf = d.get("base"), d.get("unfused") or d.get("peft")  # eager baseline: PEFT for DoRA
        r1 = f"{best.ms_median / base.ms_median:.3f}" if best and base and base.mode == "fwdbwd" else "-"
        r2 = f"{unf.ms_median / best.ms_median:.3f}" if best and unf and unf.mode == "fwdbwd" else "-"
        r3 = (f"{_mib(best.saved_bytes)} / {_mib(unf.saved_bytes)}"
              if best and unf and best.saved_bytes is not None and unf.saved_bytes is not None else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {r1} | {r2} | {r3} |")
    return "\n".join(lines)


def write_results(rows: list[Row], path: str, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)

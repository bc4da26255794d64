"""LoRA / DoRA linear microbenchmarks: the harness behind ``lora-kernels bench``, ``bench/gpu_suite.py``
and the pytest-benchmark file ``bench/test_bench_providers.py``.

Providers (each validated once, y and every gradient against an fp32 reference, before it is timed):
    base     F.linear(x, W, b) alone: the frozen layer, the physical floor (forward; dx in backward)
    unfused  the strongest eager path: cuBLAS x·Wᵀ + b, F.dropout, then
             y.addmm_((drop(x)·Aᵀ), Bᵀ, alpha=s) in place; LoRA only (for DoRA the eager baselines
             are PEFT's layer and the compiled reference)
    peft     PEFT's lora.Linear (use_dora for DoRA shapes), when peft is installed
    compile  torch.compile of the reference's formula (lora_kernels.reference), with the mask drawn by
             F.dropout: compiling the reference's int64 Philox twin kept Inductor busy for over ten
             minutes on CPU (torch 2.13), and a compiled model would use torch's own dropout anyway
    torch    lora_kernels, torch backend
    fused    lora_kernels, Triton fused path
    hybrid   lora_kernels, Triton hybrid path (cuBLAS GEMMs + Triton LoRA kernels)

Our providers and ``base`` are validated at the shape's dropout rate (same seeded mask as the
reference); ``unfused``, ``peft`` and ``compile`` draw their own masks, so they are validated with
dropout off. Modes: ``fwd`` (forward, no graph), ``bwd`` (backward only, graph retained), ``fwdbwd``.

Figures per row: every timed repetition, median and 20th/80th percentiles (CUDA: Triton's
``do_bench``, CUDA events after warm-up; CPU: ``perf_counter``), time relative to the floor and
speed-up over each baseline measured in the same process, TFLOP/s, peak CUDA memory of one fwd+bwd
above the inputs, and bytes saved for backward beyond x and the parameters (exact, from
``saved_tensors_hooks``: meaningful on CPU too).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from ._triton_env import HAS_TRITON, is_interpreter, triton_version
from .functional import dora_linear, lora_linear
from .reference import dora_weight_norm_ref, lora_linear_ref, dora_linear_ref

PROVIDERS = ("base", "unfused", "peft", "compile", "torch", "fused", "hybrid")
OUR_PROVIDERS = ("torch", "fused", "hybrid")
BASELINES = ("unfused", "peft", "compile")  # what users run today
SAME_MASK_PROVIDERS = ("base",) + OUR_PROVIDERS  # validated at the shape's dropout rate
MODES = ("fwd", "bwd", "fwdbwd")
SEED = 1234
SCALE = 2.0

CPU_NOTE = ("CPU run: timings on CPU say nothing about GPU speed (the Triton paths run in Triton's "
            "CPU interpreter and are validated, not timed); the saved-for-backward bytes are exact on any device.")
UNTIMED_REASON = "Triton interpreter (CPU): validated and bytes measured, not timed"
INTERPRETED_PROVIDERS = ("fused", "hybrid")  # run in Triton's interpreter without a GPU

LLAMA3_8B_PROJECTIONS = {  # name: (in_features K, out_features N)
    "q/o 4096→4096": (4096, 4096),
    "k/v 4096→1024": (4096, 1024),
    "gate/up 4096→14336": (4096, 14336),
    "down 14336→4096": (14336, 4096),
}
# The same four projections at 1/32 scale: small enough for the Triton interpreter.
SMALL_PROJECTIONS = {
    "q/o 128→128": (128, 128),
    "k/v 128→32": (128, 32),
    "gate/up 128→448": (128, 448),
    "down 448→128": (448, 128),
}

DEFAULT_GPU_PROVIDERS = ("base", "unfused", "peft", "fused", "hybrid", "compile")
DEFAULT_CPU_PROVIDERS = ("base", "unfused", "peft", "torch", "fused", "hybrid")


# ----------------------------------------------------------------------------------------- shapes

@dataclass
class Shape:
    name: str
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dropout_p: float
    dtype: str = "bfloat16"
    dora: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kind(self) -> str:
        return "DoRA" if self.dora else "LoRA"

    def __str__(self) -> str:
        return f"{self.kind} {self.name} M={self.m} r={self.r} p={self.dropout_p} {self.dtype}"

    def flops(self, mode: str, provider: str | None = None) -> float:
        """Flops of the definition's GEMMs (no dW: W is frozen). ``base`` counts only x·Wᵀ and g·W;
        DoRA with dropout adds PEFT's second product with W (forward and its dx)."""
        m, n, k, r = self.m, self.n, self.k, self.r
        if provider == "base":
            fwd, bwd = 2 * m * n * k, 2 * m * n * k
        else:
            fwd = 2 * m * n * k + 2 * m * r * (k + n)
            bwd = 2 * m * n * k + 4 * m * r * (k + n)  # dx GEMM; v, dB, dA, v·A
            if self.dora and self.dropout_p > 0:
                fwd, bwd = fwd + 2 * m * n * k, bwd + 2 * m * n * k
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def default_shapes(tokens=(2048, 8192, 16384), ranks=(16,), dropouts=(0.0, 0.1), extra_ranks=(8, 64),
                   projections=None, dtype="bfloat16"):
    """The GPU default: every projection at every token count (r = ranks[0], both dropout rates); the
    rank sweep (extra_ranks, p = 0.1) at the middle token count; DoRA (r = ranks[0], both rates) there too."""
    projections = projections or LLAMA3_8B_PROJECTIONS
    mid = tokens[len(tokens) // 2]
    shapes = [Shape(name, m, k, n, r, p, dtype) for name, (k, n) in projections.items()
              for m in tokens for p in dropouts for r in ranks]
    shapes += [Shape(name, mid, k, n, r, 0.1, dtype) for name, (k, n) in projections.items() for r in extra_ranks]
    shapes += [Shape(name, mid, k, n, ranks[0], p, dtype, dora=True)
               for name, (k, n) in projections.items() for p in dropouts]
    return shapes


def quick_shapes(projections=None, tokens=(2048, 8192), dtype="bfloat16"):
    """``--quick`` on a GPU: every projection, r = 16; LoRA p = 0.1 at both token counts, p = 0 and
    DoRA p = 0.1 at the larger one. Most informative first (a time budget may cut the tail)."""
    projections = projections or LLAMA3_8B_PROJECTIONS
    big, small = max(tokens), min(tokens)
    shapes = [Shape(name, big, k, n, 16, 0.1, dtype) for name, (k, n) in projections.items()]
    shapes += [Shape(name, big, k, n, 16, 0.1, dtype, dora=True) for name, (k, n) in projections.items()]
    shapes += [Shape(name, small, k, n, 16, 0.1, dtype) for name, (k, n) in projections.items() if small != big]
    shapes += [Shape(name, big, k, n, 16, 0.0, dtype) for name, (k, n) in projections.items()]
    return shapes


def cpu_shapes():
    """The CPU default: the Llama projections at 1/32 scale, fp32, r = 8, p = 0.1, at 32 and 128
    tokens, and DoRA on two of them (the Triton paths run in the interpreter: about a minute)."""
    shapes = [Shape(name, m, k, n, 8, 0.1, "float32") for name, (k, n) in SMALL_PROJECTIONS.items() for m in (32, 128)]
    shapes += [Shape(name, 32, k, n, 8, 0.1, "float32", dora=True)
               for name, (k, n) in list(SMALL_PROJECTIONS.items())[:2]]
    return shapes


def cpu_quick_shapes():
    """``--quick`` on CPU: one LoRA and one DoRA tiny shape, p = 0.1 (seconds, in the interpreter)."""
    return [Shape("tiny 96→80", 64, 96, 80, 8, 0.1, "float32"),
            Shape("tiny 96→80", 64, 96, 80, 8, 0.1, "float32", dora=True)]


PRESETS = {
    "full": (default_shapes, "Llama-3-8B projections at 2048/8192/16384 tokens, r 8/16/64, p 0/0.1, bf16, LoRA+DoRA"),
    "quick": (quick_shapes, "Llama-3-8B projections, 2048/8192 tokens, r 16, bf16, LoRA+DoRA"),
    "cpu": (cpu_shapes, "Llama projections at 1/32 scale, 32/128 tokens, r 8, p 0.1, fp32, LoRA+DoRA"),
    "cpu-quick": (cpu_quick_shapes, "one tiny LoRA and one tiny DoRA shape, fp32, p 0.1"),
}


def parse_projections(spec: str) -> dict[str, tuple[int, int]]:
    """'4096x1024,14336x4096' (in×out) or names of the Llama-3-8B projections ('q/o', 'down', ...)."""
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        named = [name for name in LLAMA3_8B_PROJECTIONS if name.split()[0] == item or name == item]
        if named:
            out[named[0]] = LLAMA3_8B_PROJECTIONS[named[0]]
            continue
        try:
            k, n = (int(v) for v in item.lower().replace("→", "x").split("x"))
        except ValueError:
            raise ValueError(f"projection {item!r}: expected IN x OUT (e.g. 4096x1024) or one of "
                             f"{[p.split()[0] for p in LLAMA3_8B_PROJECTIONS]}") from None
        out[f"{k}→{n}"] = (k, n)
    return out


def grid_shapes(projections, tokens, ranks, dropouts, dtypes, kinds=("lora",)):
    """The full cross product (what ``--projections/--tokens/--ranks/--dropouts/--dtypes/--kinds`` give)."""
    return [Shape(name, m, k, n, r, p, dt, dora=(kind == "dora"))
            for kind in kinds for name, (k, n) in projections.items() for m in tokens
            for r in ranks for p in dropouts for dt in dtypes]


# -------------------------------------------------------------------------------------- providers

def make_problem(shape: Shape, device: str, seed: int = 0):
    """(x, W, b, A, B, grad_y, magnitude or None), random (B too), in the shape's dtype."""
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
        mag = (dora_weight_norm_ref(w.float(), a.detach().float(), b.detach().float(), SCALE) * 1.1).to(dt)
        mag.requires_grad_(True)
    return x, w, bias, a, b, grad, mag


@dataclass
class Provider:
    fn: object  # zero-argument callable computing y
    params: list  # tensors to differentiate, in the order of grad_names
    grad_names: list
    owned: list = field(default_factory=list)  # the provider's own copies of the parameters


class Unavailable(Exception):
    """A provider that cannot run here (peft missing, no Triton, ...): reported, not failed."""


def _reference_formula(x, w, bias, a, b, mag, scale: float, p: float):
    """The reference's LoRA / DoRA formula (lora_kernels.reference) with F.dropout's mask: what
    ``compile`` compiles."""
    xd = F.dropout(x, p, training=True) if p > 0 else x
    if mag is None:
        return F.linear(x, w, bias) + scale * ((xd @ a.t()) @ b.t())
    c = mag / dora_weight_norm_ref(w, a, b, scale).detach()
    base = x @ w.t()
    if p > 0:
        y = base + (c - 1) * (xd @ w.t()) + c * (scale * ((xd @ a.t()) @ b.t()))
    else:
        y = c * (base + scale * ((x @ a.t()) @ b.t()))
    return y + bias


def provider_fn(provider: str, shape: Shape, problem, scale: float = SCALE,
                compile_backend: str = "inductor") -> Provider | None:
    """The provider's callable for ``shape``; None when it does not apply (``unfused`` for DoRA);
    raises :class:`Unavailable` when it cannot run here."""
    x, w, bias, a, b, _, mag = problem
    p = shape.dropout_p
    dora_names = ["dx", "dA", "dB", "dm"] if shape.dora else ["dx", "dA", "dB"]
    lora_params = [x, a, b] + ([mag] if shape.dora else [])
    if provider == "base":
        return Provider(lambda: F.linear(x, w, bias), [x], ["dx"])
    if provider == "unfused":
        if shape.dora:
            return None

        def unfused():
            y = F.linear(x, w, bias)
            xd = F.dropout(x, p, training=True) if p > 0 else x
            return y.addmm_(xd @ a.t(), b.t(), alpha=scale)
        return Provider(unfused, [x, a, b], ["dx", "dA", "dB"])
    if provider == "compile":
        try:
            compiled = torch.compile(_reference_formula, backend=compile_backend, dynamic=False)
        except Exception as exc:  # e.g. no compiler support on this platform
            raise Unavailable(f"torch.compile unavailable: {type(exc).__name__}: {exc}") from exc
        return Provider(lambda: compiled(x, w, bias, a, b, mag, scale, p), lora_params, dora_names)
    if provider == "peft":
        try:
            import peft
        except ImportError as exc:
            raise Unavailable("peft is not installed") from exc

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
        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if shape.dora:
                layer.lora_magnitude_vector["default"].weight.copy_(mag)
                params.append(layer.lora_magnitude_vector["default"].weight)
        model.train()
        return Provider(lambda: layer(x), params, dora_names, owned=list(model.parameters()))
    if provider in ("fused", "hybrid"):
        if not HAS_TRITON:
            raise Unavailable("Triton is not installed")
        if x.device.type != "cuda" and not is_interpreter():
            raise Unavailable("the Triton paths need a GPU or TRITON_INTERPRET=1")
    if provider in OUR_PROVIDERS and shape.dora:
        return Provider(lambda: dora_linear(x, w, a, b, mag, scale, bias=bias, dropout_p=p, seed=SEED,
                                            backend=provider), lora_params, dora_names)
    if provider in OUR_PROVIDERS:
        return Provider(lambda: lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, seed=SEED, backend=provider),
                        lora_params, dora_names)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom else num


def validate(provider: str, shape: Shape, problem, scale: float = SCALE,
             compile_backend: str = "inductor") -> dict[str, float]:
    """Normwise relative error of y and of every gradient against an fp32 reference on the same
    inputs (same mask for ``base`` and our providers; the others are validated with dropout off)."""
    x, w, bias, a, b, grad, mag = problem
    p = shape.dropout_p if provider in SAME_MASK_PROVIDERS else 0.0
    made = provider_fn(provider, replace(shape, dropout_p=p), problem, scale, compile_backend)
    y = made.fn()
    grads = torch.autograd.grad(y, made.params, grad)
    leaves = [t.detach().float().requires_grad_(True) for t in (x, a, b) + ((mag,) if shape.dora else ())]
    w32, b32 = w.float(), bias.float()
    if provider == "base":
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


# ----------------------------------------------------------------------------------------- timing

def _percentile(sorted_times: list[float], q: float) -> float:
    if not sorted_times:
        return float("nan")
    pos = q * (len(sorted_times) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


CPU_MIN_REPS = 30  # a median with its spread (p20-p80) needs more than a handful of repetitions
CPU_MIN_SECONDS = 0.25  # and at least this long per figure (more repetitions for sub-ms calls)
CPU_MAX_SECONDS = 1.5  # but no longer: a figure that gets fewer than CPU_MIN_REPS is not reported
CPU_MAX_REPS = 2000
CPU_THREADS = 1  # one thread: on a shared machine a multi-threaded op waits on its slowest thread
CPU_MAX_SPREAD = 0.3  # (p80 - p20) / median above this: the figure is reported as unstable, not plotted


def make_timer(device: str, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int | None = None,
               cpu_min_s: float = CPU_MIN_SECONDS, cpu_max_s: float = CPU_MAX_SECONDS,
               cpu_threads: int | None = CPU_THREADS):
    """A function fn -> list of per-call times (ms). CUDA: ``triton.testing.do_bench`` (CUDA events,
    L2 flushed, after ``warmup_ms`` of warm-up, ``rep_ms`` of repetitions), or plain CUDA events
    without Triton. CPU: on ``cpu_threads`` torch threads, three warm-up calls, then calls timed with
    perf_counter: exactly ``cpu_reps`` if given, else until CPU_MIN_REPS calls and ``cpu_min_s`` seconds
    (stopping at CPU_MAX_REPS calls or ``cpu_max_s`` seconds, whichever comes first)."""
    if device == "cuda":
        if HAS_TRITON:
            import triton.testing

            def bench_cuda(fn):
                try:
                    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
                except (TypeError, ValueError, AssertionError):  # an older Triton: quantiles only
                    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
                return [float(t) for t in times]
            return bench_cuda

        def bench_events(fn, reps=20):
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return times
        return bench_events

    def bench_cpu(fn):
        threads = torch.get_num_threads()
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        try:
            for _ in range(1 if cpu_reps is not None else 3):
                fn()
            times = []
            start = time.perf_counter()
            while True:
                elapsed = time.perf_counter() - start
                if cpu_reps is not None:
                    if len(times) >= cpu_reps:
                        break
                elif (len(times) >= CPU_MAX_REPS or elapsed >= cpu_max_s
                      or (len(times) >= CPU_MIN_REPS and elapsed >= cpu_min_s)):
                    break
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        finally:
            torch.set_num_threads(threads)
        return times
    bench_cpu.min_reps = cpu_reps or CPU_MIN_REPS  # fewer timed calls than this: not a stable figure
    return bench_cpu


def saved_bytes(fn, known: set[int]) -> int:
    """Bytes saved for backward by one forward, beyond tensors whose storage is in ``known`` (x and
    the parameters, alive anyway)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.data_ptr() in known or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _peak_mem_mb(fn, params, grad) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), params, grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    """One measurement. mode: fwd | bwd | fwdbwd (timed), saved (saved bytes only, no timing),
    invalid (failed validation: not timed), skipped (could not run here; reason in extra)."""
    shape: dict
    provider: str
    mode: str
    ms_median: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    tflops: float = float("nan")
    peak_mem_mb: float | None = None
    saved_bytes: int | None = None
    times_ms: list = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


TIMED = ("fwd", "bwd", "fwdbwd")


def run_shape(shape: Shape, providers, device: str, modes=MODES, tol: float | None = None, *, timer=None,
              compile_backend: str = "inductor", deadline: float | None = None, on_provider=None,
              on_rows=None, untimed=()) -> list[Row]:
    """Rows for one shape. A provider that fails validation is reported ('invalid'), not timed; one
    that cannot run here is reported ('skipped', with the reason). ``modes=()`` measures saved
    bytes only; so do the providers in ``untimed`` (on CPU: the Triton paths, which run in the
    interpreter, whose times mean nothing). ``on_provider(shape, provider)`` is called before each
    provider, ``on_rows(rows)`` after each with the shape's rows so far (to save partial results)."""
    tol = VALIDATION_TOL.get(shape.dtype, 3e-2) if tol is None else tol
    problem = make_problem(shape, device)
    x, w, bias, a, b, grad, mag = problem
    base_known = {t.data_ptr() for t in (x, w, bias, a, b) + ((mag,) if mag is not None else ())}
    bench = timer or make_timer(device)
    sd = asdict(shape)
    rows: list[Row] = []
    for provider in providers:
        if on_provider is not None:
            on_provider(shape, provider)
        if on_rows is not None and rows:
            add_ratios(rows)
            on_rows(rows)
        if deadline is not None and time.time() > deadline:
            rows.append(Row(sd, provider, "skipped", extra={"reason": "time budget reached"}))
            continue
        if provider == "compile":
            torch._dynamo.reset()  # one compiled graph per shape; never hit the recompile limit
        try:
            made = provider_fn(provider, shape, problem, compile_backend=compile_backend)
        except Unavailable as exc:
            rows.append(Row(sd, provider, "skipped", extra={"reason": str(exc)}))
            continue
        except Exception as exc:  # e.g. another PEFT version's API: a baseline we cannot build is skipped
            reason = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(Row(sd, provider, "skipped" if provider in BASELINES else "invalid", extra={"reason": reason}))
            continue
        if made is None:
            continue  # does not apply to this shape
        try:
            errors = validate(provider, shape, problem, compile_backend=compile_backend)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if provider == "compile":  # compilation failed (no compiler, unsupported op): not ours to fix
                rows.append(Row(sd, provider, "skipped", extra={"reason": "torch.compile failed: " + reason}))
            else:
                rows.append(Row(sd, provider, "invalid", extra={"reason": reason}))
            continue
        err = max(errors.values())
        if not err <= tol:  # NaN fails too
            rows.append(Row(sd, provider, "invalid", extra={"rel_err": err, "errors": errors, "tol": tol}))
            continue
        extra = {"rel_err": err, "errors": errors, "tol": tol}
        fn, params = made.fn, made.params
        prov_modes = () if provider in untimed else modes
        if provider in untimed and modes:
            extra["not_timed"] = UNTIMED_REASON
        prov_rows = []
        try:
            for mode in prov_modes:
                if mode == "fwd":
                    with torch.no_grad():
                        times = bench(fn)
                elif mode == "bwd":
                    y = fn()
                    times = bench(lambda: torch.autograd.grad(y, params, grad, retain_graph=True))
                    del y
                elif mode == "fwdbwd":
                    times = bench(lambda: torch.autograd.grad(fn(), params, grad))
                else:
                    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
                srt = sorted(times)
                med = statistics.median(srt)
                row = Row(sd, provider, mode, med, _percentile(srt, 0.2), _percentile(srt, 0.8),
                          shape.flops(mode, provider) / (med * 1e-3) / 1e12, times_ms=list(times), extra=dict(extra))
                if device != "cuda":
                    row.extra["spread"] = (row.ms_p80 - row.ms_p20) / med if med > 0 else float("inf")
                    row.extra["stable"] = bool(len(times) >= getattr(bench, "min_reps", CPU_MIN_REPS)
                                               and row.extra["spread"] <= CPU_MAX_SPREAD)
                prov_rows.append(row)
            if not prov_modes:
                prov_rows.append(Row(sd, provider, "saved", extra=dict(extra)))
            peak = _peak_mem_mb(fn, params, grad) if device == "cuda" else None
            known = base_known | {t.data_ptr() for t in made.owned}
            try:
                sbytes = saved_bytes(fn, known)
            except Exception:  # hooks unsupported (e.g. by a compiled graph): no figure rather than a wrong one
                sbytes = None
        except Exception as exc:
            if isinstance(exc, ValueError) and "unknown mode" in str(exc):
                raise
            if device == "cuda":
                torch.cuda.empty_cache()
            # a baseline that breaks, or any provider out of memory, is skipped; ours crashing is a failure
            oom = "out of memory" in str(exc).lower()
            rows.append(Row(sd, provider, "skipped" if provider in BASELINES or oom else "invalid",
                            extra={"reason": f"{type(exc).__name__}: {exc}"[:300]}))
            continue
        for row in prov_rows:
            row.peak_mem_mb, row.saved_bytes = peak, sbytes
        rows += prov_rows
        del made, fn, params
    add_ratios(rows)
    return rows


def shape_key(sd: dict) -> tuple:
    return ("DoRA" if sd.get("dora") else "LoRA", sd["name"], sd["m"], sd["k"], sd["n"], sd["r"], sd["dropout_p"],
            sd["dtype"])


def add_ratios(rows: list[Row]) -> None:
    """ratios['vs_base'] = time / floor's time (≥ 1 expected); ratios['speedup_vs_X'] = X's time /
    this time, for each baseline X timed at the same shape and mode."""
    index = {(shape_key(r.shape), r.provider, r.mode): r for r in rows if r.mode in TIMED}
    for r in rows:
        if r.mode not in TIMED:
            continue
        key = shape_key(r.shape)
        base = index.get((key, "base", r.mode))
        if base is not None and r.provider != "base":
            r.ratios["vs_base"] = r.ms_median / base.ms_median
        for bl in BASELINES:
            other = index.get((key, bl, r.mode))
            if other is not None and bl != r.provider:
                r.ratios[f"speedup_vs_{bl}"] = other.ms_median / r.ms_median


# ----------------------------------------------------------------------------------------- output

def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _group(rows: list[Row], modes=("fwdbwd", "saved", "invalid", "skipped")):
    by_shape: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        if row.mode not in modes:
            continue
        d = by_shape.setdefault(shape_key(row.shape), {})
        if row.provider not in d or d[row.provider].mode != "fwdbwd":
            d[row.provider] = row
    return by_shape


def _best_ours(d: dict[str, Row]) -> Row | None:
    """The fastest of our timed providers (torch, fused, hybrid: every one that was timed), else, for
    the bytes, the first of ours that was validated without timing."""
    timed = [d[p] for p in OUR_PROVIDERS if p in d and d[p].mode == "fwdbwd"]
    if timed:
        return min(timed, key=lambda r: r.ms_median)
    return next((d[p] for p in OUR_PROVIDERS if p in d and d[p].mode == "saved"), None)


def markdown_table(rows: list[Row]) -> str:
    """Summary: one line per shape with the fwd+bwd median of each provider, the best of ours (fused /
    hybrid, else torch) relative to the floor, its speed-up over each baseline, and the bytes saved
    for backward by ours and by the eager baseline (unfused; PEFT for DoRA)."""
    by_shape = _group(rows)
    providers = [p for p in PROVIDERS if any(p in d for d in by_shape.values())]
    if not any(r.mode in TIMED for r in rows):
        return saved_bytes_table(by_shape, providers)
    baselines = [b for b in BASELINES if b in providers]
    head = "| kind | projection | tokens | r | p | dtype | " + " | ".join(f"{p} ms" for p in providers)
    head += " | best ours (which) / base |" + "".join(f" best ours vs {b} |" for b in baselines)
    head += " saved for bwd: ours / eager |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, d in by_shape.items():
        kind, name, m, _, _, r, p, dt = key
        cells = []
        for prov in providers:
            row = d.get(prov)
            if row is None:
                cells.append("-")
            elif row.mode in ("invalid", "skipped"):
                cells.append(row.mode)
            elif row.mode == "saved":
                cells.append("n/t")
            else:
                cells.append(f"{row.ms_median:.3f}")
        best = _best_ours(d)
        timed = best is not None and best.mode == "fwdbwd"
        base = d.get("base")
        r1 = (f"{best.ms_median / base.ms_median:.3g}× ({best.provider})" if timed and base and base.mode == "fwdbwd"
              else "-")
        ratios = []
        for bl in baselines:
            other = d.get(bl)
            ratios.append(f"{other.ms_median / best.ms_median:.3g}×" if timed and other and other.mode == "fwdbwd"
                          else "-")
        eager = next((d[e] for e in ("unfused", "peft") if e in d and d[e].saved_bytes is not None), None)
        r3 = (f"{_mib(best.saved_bytes)} / {_mib(eager.saved_bytes)}"
              if best and eager and best.saved_bytes is not None else "-")
        lines.append(f"| {kind} | {name} | {m} | {r} | {p} | {dt} | " + " | ".join(cells) + f" | {r1} | "
                     + "".join(f"{x} | " for x in ratios) + f"{r3} |")
    return "\n".join(lines)


def saved_bytes_table(by_shape: dict, providers: list[str]) -> str:
    """Without timings (``--saved-bytes-only``): the bytes each provider saves for backward."""
    head = "| kind | projection | tokens | K→N | r | p | dtype | " + " | ".join(f"{p}" for p in providers) + " |"
    lines = ["Bytes saved for backward beyond x and the parameters (exact):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for key, d in by_shape.items():
        kind, name, m, k, n, r, p, dt = key
        cells = [("-" if d.get(prov) is None else d[prov].mode if d[prov].mode in ("invalid", "skipped")
                  else _mib(d[prov].saved_bytes)) for prov in providers]
        lines.append(f"| {kind} | {name} | {m} | {k}→{n} | {r} | {p} | {dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(rows: list[Row]) -> str:
    """Every provider at every shape: its max relative error (y and every gradient) against the
    reference and the tolerance, or why it is invalid or skipped."""
    by_shape = _group(rows, modes=("fwdbwd", "fwd", "bwd", "saved", "invalid", "skipped"))
    providers = [p for p in PROVIDERS if any(p in d for d in by_shape.values())]
    head = "| kind | projection | tokens | K→N | r | p | dtype | " + " | ".join(providers) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, d in by_shape.items():
        kind, name, m, k, n, r, p, dt = key
        cells = []
        for prov in providers:
            row = d.get(prov)
            if row is None:
                cells.append("-")
            elif row.mode == "skipped":
                cells.append("skipped")
            elif row.mode == "invalid":
                cells.append("**INVALID**")
            else:
                cells.append(f"ok {row.extra.get('rel_err', float('nan')):.0e}")
        lines.append(f"| {kind} | {name} | {m} | {k}→{n} | {r} | {p} | {dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stable(row: Row) -> bool:
    """A timed figure worth showing: on a GPU always; on a CPU when it had enough repetitions and its
    p20-p80 spread is within CPU_MAX_SPREAD of the median."""
    return row.extra.get("stable", True)


def cpu_timing_table(rows: list[Row], mode: str = "fwdbwd") -> str:
    """CPU timings of the providers that were timed (eager torch code; not the interpreter): the
    median, its p20-p80 spread and the number of repetitions, and the time relative to the floor."""
    timed = [r for r in rows if r.mode == mode]
    by_shape: dict[tuple, dict[str, Row]] = {}
    for r in timed:
        by_shape.setdefault(shape_key(r.shape), {})[r.provider] = r
    providers = [p for p in PROVIDERS if any(p in d for d in by_shape.values())]
    if not providers:
        return "(nothing was timed)"
    head = ("| kind | projection | tokens | r | p | dtype | "
            + " | ".join(f"{p}: median ms [p20–p80] (reps)" for p in providers)
            + " | " + " | ".join(f"{p} / base" for p in providers if p != "base") + " |")
    fewest = min(len(r.times_ms) for r in timed)
    lines = [f"Median of {fewest} or more timed calls on {CPU_THREADS} thread(s), p20–p80 in brackets, "
             f"repetitions in parentheses; a figure whose spread exceeds {CPU_MAX_SPREAD:.0%} of its median "
             "(another job sharing the CPU) is marked unstable and left out of the ratios and the plot.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for key, d in by_shape.items():
        kind, name, m, _, _, r, p, dt = key

        def cell(q):
            if q not in d:
                return "-"
            row = d[q]
            text = f"{row.ms_median:.3f} [{row.ms_p20:.3f}–{row.ms_p80:.3f}] ({len(row.times_ms)})"
            return text if _stable(row) else f"unstable: {text}"

        cells = [cell(q) for q in providers]
        base = d.get("base")
        rel = [(f"{d[q].ms_median / base.ms_median:.3g}×" if q in d and base and _stable(d[q]) and _stable(base)
                else "-") for q in providers if q != "base"]
        lines.append(f"| {kind} | {name} | {m} | {r} | {p} | {dt} | " + " | ".join(cells + rel) + " |")
    return "\n".join(lines)


def modeled_section(shapes: list[dict]) -> str:
    """The modeled GPU ratios, from the compile-level performance report (:mod:`lora_kernels.perf`):
    every launch of the real LoRA forward+backward compiled for sm_90a, its binary read, and a roofline
    model of an H200 (docs/performance-model.md). Always at the Llama-3-8B projections, M = 8192,
    r = 16, bf16, p = 0 and 0.1 (the CPU preset's small shapes would model nothing useful), so
    ``shapes`` is not used. Its caller labels the section "modeled"; nothing in it was measured."""
    del shapes
    from . import perf
    from ._triton_env import HAS_TRITON

    if not HAS_TRITON:
        return "No modeled GPU figures: the compile-level report needs Triton (pip install triton)."
    try:
        rows = perf.modeled_ratios(kinds=["lora"], targets=["sm_90a"], check_hazards=False)
    except Exception as exc:  # the report is an addition to the bench: say why it is missing, keep the rest
        return f"No modeled GPU figures: the compile-level report failed ({type(exc).__name__}: {exc})."
    return ("Modeled, not measured: H200 roofline of the kernels as compiled here for sm_90a "
            "(`lora-kernels inspect` for the per-launch details; assumptions in docs/performance-model.md).\n\n"
            + perf.markdown(rows))


def cpu_report(rows: list[Row]) -> str:
    """What is true on a CPU, for the terminal and bench.md: validation of every path, the exact
    saved-for-backward bytes, CPU timings of the eager providers, and the (modeled) GPU section."""
    by_shape = _group(rows)
    providers = [p for p in PROVIDERS if any(p in d for d in by_shape.values())]
    shapes = [r.shape for r in rows]
    shapes = list({shape_key(sd): sd for sd in shapes}.values())
    parts = [
        "## 1. Validation (measured): max relative error of y and every gradient against the reference",
        "", validation_table(rows), "",
        "## 2. Bytes saved for backward per layer (measured, exact; the same on any device)", "",
        saved_bytes_table(by_shape, providers).split("\n", 2)[2], "",
        "## 3. CPU timings (measured on this CPU; forward + backward; they say nothing about GPU speed)", "",
        *(["The Triton paths run in Triton's CPU interpreter here: validated above, not timed.", ""]
          if any(r.extra.get("not_timed") for r in rows) else []),
        cpu_timing_table(rows), "",
        "## 4. Modeled GPU ratios (modeled, not measured)", "",
        modeled_section(shapes),
    ]
    return "\n".join(parts)


def model_saved_bytes(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      rank: int = 8, dropout: float = 0.1, batch: int = 2, seq: int = 64) -> dict | None:
    """Bytes saved for backward by one training forward of a whole model (a small Llama built from a
    config: 2 layers, hidden 128, FFN 448, fp32; no download), LoRA on ``targets``: ours vs PEFT's
    layers. Exact (saved_tensors_hooks; parameters excluded, each storage
    counted once). None when transformers is not installed; the PEFT figure is None without peft."""
    try:
        import transformers
    except ImportError:
        return None
    from . import LoraConfig, inject

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=seq)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).train()
        model.requires_grad_(False)
        return model

    def measure(model):
        known = {p.data_ptr() for p in model.parameters()}
        return saved_bytes(lambda: model(input_ids=ids).logits.float().sum(), known)

    out = {"model": "Llama (2 layers, hidden 128, FFN 448, fp32)", "tokens": batch * seq, "targets": list(targets),
           "rank": rank, "dropout": dropout, "layers": 2 * len(targets)}
    ours = build()
    inject(ours, LoraConfig(rank=rank, alpha=2 * rank, dropout=dropout, target_modules=list(targets)))
    out["ours"] = measure(ours)
    try:
        import peft
        model = peft.get_peft_model(build(), peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                             target_modules=list(targets)))
        out["peft"] = measure(model.train())
    except Exception as exc:  # peft missing or another version's API: said, not hidden
        out["peft"] = None
        out["peft_reason"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def model_saved_markdown(d: dict) -> str:
    lines = [f"Whole model, bytes saved for backward by one training forward (exact): {d['model']}, "
             f"{d['tokens']} tokens, LoRA r={d['rank']} p={d['dropout']} on {', '.join(d['targets'])} "
             f"({d['layers']} layers):", "",
             "| ours | PEFT | PEFT − ours |", "|---|---|---|"]
    peft_b = d.get("peft")
    diff = _mib(peft_b - d["ours"]) if peft_b is not None else "-"
    lines.append(f"| {_mib(d['ours'])} | "
                 f"{_mib(peft_b) if peft_b is not None else 'n/a (' + d.get('peft_reason', '') + ')'} | {diff} |")
    return "\n".join(lines)


def markdown_details(rows: list[Row]) -> str:
    """Every row: median [p20–p80], time / floor, speed-up over each baseline, TFLOP/s, peak memory,
    saved bytes; the reason for invalid or skipped providers."""
    head = ("| kind | projection | tokens | r | p | dtype | provider | mode | median ms [p20–p80] | × floor | "
            + "".join(f"vs {b} | " for b in BASELINES) + "TFLOP/s | peak MiB | saved for bwd | max rel err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        kind, name, m, _, _, r, p, dt = shape_key(row.shape)
        lead = f"| {kind} | {name} | {m} | {r} | {p} | {dt} | {row.provider} | {row.mode} | "
        if row.mode in ("invalid", "skipped"):
            why = row.extra.get("reason") or f"rel err {row.extra.get('rel_err', float('nan')):.2e} > tol"
            lines.append(lead + why.replace("|", "/") + " |" + " |" * (head.count("|") - 10))
            continue
        timing = "-" if row.mode == "saved" else f"{row.ms_median:.3f} [{row.ms_p20:.3f}–{row.ms_p80:.3f}]"
        rat = [f"{row.ratios[k]:.3g}×" if k in row.ratios else "-"
               for k in ["vs_base"] + [f"speedup_vs_{b}" for b in BASELINES]]
        tf = "-" if row.mode == "saved" else f"{row.tflops:.3g}"
        peak = "-" if row.peak_mem_mb is None else f"{row.peak_mem_mb:.1f}"
        lines.append(lead + f"{timing} | " + " | ".join(rat) + f" | {tf} | {peak} | {_mib(row.saved_bytes)} | "
                     f"{row.extra.get('rel_err', float('nan')):.1e} |")
    return "\n".join(lines)


def hardware_line(meta: dict) -> str:
    where = meta.get("gpu") or f"CPU: {meta.get('cpu') or 'unknown'}"
    return (f"{where}; torch {meta.get('torch')}, triton {meta.get('triton')}, peft {meta.get('peft')}, "
            f"lora_kernels {meta.get('lora_kernels')} ({meta.get('git_commit') or 'no git commit'}); "
            f"{meta.get('date')}")


def report_markdown(rows: list[Row], meta: dict) -> str:
    parts = [f"# lora-kernels bench: {hardware_line(meta)}", ""]
    if meta.get("device") != "cuda":
        parts += [f"**{CPU_NOTE}**", "", cpu_report(rows), ""]
    else:
        parts += ["Summary (forward + backward, measured on this GPU):", "", markdown_table(rows), ""]
    parts += ["All figures:", "", markdown_details(rows)]
    if meta.get("model_saved"):
        parts += ["", model_saved_markdown(meta["model_saved"])]
    return "\n".join(parts) + "\n"


def _git(args: list[str], cwd: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def env_info() -> dict:
    """Hardware, versions, git commit and date, for the JSON and the table headers."""
    from . import __version__

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "lora_kernels": __version__,
        "cuda_runtime": torch.version.cuda,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu_name(),
        "triton_interpreter": is_interpreter(),
    }
    for mod in ("peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    info["driver"] = None
    if info["gpu"]:
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info["git_commit"] = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) if info["git_commit"] else None
    info["git_dirty"] = bool(status) if status is not None else None
    return info


def write_results(rows: list[Row], path: str, meta: dict) -> None:
    """JSON of every raw figure (every timed repetition included) with the environment."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1, default=str)
    os.replace(tmp, path)


def load_results(path: str) -> tuple[list[Row], dict]:
    with open(path) as f:
        data = json.load(f)
    return [Row(**r) for r in data["rows"]], data["meta"]


# ------------------------------------------------------------------------------------------ plots

_COLORS = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}  # one colour per provider in every panel


def _baseline_for(rows_of_group) -> str | None:
    have = {r.provider for r in rows_of_group if r.mode == "fwdbwd"}
    return next((b for b in ("unfused", "peft", "compile", "base") if b in have), None)


def _shape_label(sd: dict) -> str:
    kind = "DoRA" if sd.get("dora") else "LoRA"
    return f"{kind} {sd['name']}, {sd['m']} tokens, r={sd['r']}, p={sd['dropout_p']}"


def _where(meta: dict | None) -> str:
    meta = meta or {}
    return meta.get("gpu") or (meta.get("cpu") or "CPU")


def _hbar_panel(ax, labels, series, xlabel, log_x=True, errors=None, annotate=None):
    """Grouped horizontal bars: one row per label, one bar per series (provider), legible labels."""
    import numpy as np

    n = max(len(series), 1)
    height = 0.8 / n
    ypos = np.arange(len(labels))
    for si, (prov, values) in enumerate(series.items()):
        ys = ypos + (si - (n - 1) / 2) * height
        vals = [v if v is not None else float("nan") for v in values]
        xerr = None
        if errors is not None and prov in errors:
            xerr = np.array(errors[prov], dtype=float).T
        ax.barh(ys, vals, height=height, label=prov, color=_COLORS.get(prov), xerr=xerr, capsize=2)
        if annotate is not None:
            for y, v in zip(ys, values):
                if v is not None:
                    ax.text(v if v > 0 else 0, y, " " + annotate(v), va="center", fontsize=7)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    if log_x:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def write_plots(rows: list[Row], out_dir: str, log=print, cpu: bool = False, meta: dict | None = None) -> list[str]:
    """PNG plots, one message each, titled with the hardware, dtype and what is measured:
    memory.png (bytes saved for backward per layer: exact, on any device); on a GPU speedup.png
    (fwd+bwd speed-up over the eager baseline vs tokens); on a CPU cpu_times.png (CPU timings of the
    eager providers, median with the p20-p80 spread; the interpreter-run Triton paths are not
    timed). Without matplotlib: a message and no files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no PNG plots (pip install matplotlib); the JSON and tables are written")
        return []
    written = []
    where = _where(meta)
    dtypes = ", ".join(dict.fromkeys(r.shape["dtype"] for r in rows)) or "-"

    # --- memory.png: exact bytes saved for backward (log axis: 0.5 KiB to MiB) --------------------
    mem = [r for r in rows if r.mode in ("fwdbwd", "saved") and r.saved_bytes is not None]
    if mem:
        labels = list(dict.fromkeys(_shape_label(r.shape) for r in mem))
        provs = [p for p in PROVIDERS if any(r.provider == p for r in mem)]
        series = {}
        for prov in provs:
            vals = []
            for lab in labels:
                hit = [r.saved_bytes for r in mem if r.provider == prov and _shape_label(r.shape) == lab]
                vals.append(hit[0] / 1024 if hit else None)
            series[prov] = vals
        # zero bytes (the frozen floor saves nothing beyond x) cannot sit on a log axis: annotate
        positive = [v for vals in series.values() for v in vals if v]
        lo = min(positive) / 2 if positive else 0.1
        fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * len(labels) * max(1, len(provs)) / 2.5))
        shown = {p: [(v if v else lo) if v is not None else None for v in vals] for p, vals in series.items()}
        _hbar_panel(ax, labels, shown, "KiB saved for backward beyond x and the parameters (log scale)",
                    annotate=None)
        for si, (prov, vals) in enumerate(series.items()):
            n = len(series)
            for li, v in enumerate(vals):
                if v is not None:
                    y = li + (si - (n - 1) / 2) * (0.8 / n)
                    ax.text(shown[prov][li], y, f" {v:.1f}" if v else " 0", va="center", fontsize=7)
        ax.set_title(f"Bytes saved for backward per layer — measured, exact (the same on any device)\n"
                     f"{where}; {dtypes}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "memory.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    timed = [r for r in rows if r.mode == "fwdbwd" and _stable(r)]
    if cpu and timed:
        # --- cpu_times.png: CPU timings of eager code, median and p20-p80 (log axis) ---------------
        labels = list(dict.fromkeys(_shape_label(r.shape) for r in timed))
        provs = [p for p in PROVIDERS if any(r.provider == p for r in timed)]
        series, errors = {}, {}
        for prov in provs:
            vals, errs = [], []
            for lab in labels:
                hit = [r for r in timed if r.provider == prov and _shape_label(r.shape) == lab]
                if hit:
                    r = hit[0]
                    vals.append(r.ms_median)
                    errs.append((max(r.ms_median - r.ms_p20, 0.0), max(r.ms_p80 - r.ms_median, 0.0)))
                else:
                    vals.append(None)
                    errs.append((0.0, 0.0))
            series[prov], errors[prov] = vals, errs
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(labels) * max(1, len(provs)) / 2.5))
        _hbar_panel(ax, labels, series, "forward + backward, ms (median, bars: p20–p80; log scale)", errors=errors)
        untimed = sorted({r.provider for r in rows if r.extra.get("not_timed")})
        unstable = sum(1 for r in rows if r.mode == "fwdbwd" and not _stable(r))
        ax.set_title(f"CPU timings — measured on {where}, {CPU_THREADS} thread, {dtypes}\n"
                     "(they say nothing about GPU speed)\n"
                     + (f"not timed (Triton interpreter): {', '.join(untimed)}; " if untimed else "")
                     + (f"{unstable} unstable figure(s) left out" if unstable else "all figures stable"), fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "cpu_times.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    elif timed:
        # --- speedup.png (GPU): fwd+bwd speed-up over the eager baseline vs tokens ------------------
        groups: dict[tuple, list[Row]] = {}
        for r in timed:
            sd = r.shape
            groups.setdefault(("DoRA" if sd["dora"] else "LoRA", sd["r"], sd["dropout_p"], sd["dtype"]), []).append(r)
        names = list(dict.fromkeys(r.shape["name"] for r in timed))
        fig, axes = plt.subplots(len(groups), len(names), figsize=(4.6 * len(names), 3.6 * len(groups)),
                                 squeeze=False)
        for gi, (gkey, grows) in enumerate(groups.items()):
            bl = _baseline_for(grows)
            for ni, name in enumerate(names):
                ax = axes[gi][ni]
                ref = {r.shape["m"]: r.ms_median for r in grows if r.shape["name"] == name and r.provider == bl}
                if not ref:
                    ax.set_visible(False)
                    continue
                for prov in PROVIDERS:
                    pts = sorted((r.shape["m"], ref[r.shape["m"]] / r.ms_median) for r in grows
                                 if r.shape["name"] == name and r.provider == prov and r.shape["m"] in ref)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=prov, color=_COLORS[prov])
                ax.legend(fontsize=8)
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{gkey[0]} {name} r={gkey[1]} p={gkey[2]} {gkey[3]}", fontsize=9)
                ax.set_xlabel("tokens", fontsize=9)
                if ni == 0:
                    ax.set_ylabel(f"fwd+bwd speed-up over {bl}", fontsize=9)
        fig.suptitle(f"GPU timings — measured on {where}: speed-up over the eager baseline (higher is better)",
                     fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------- progress

class _Progress:
    """tqdm on stderr, shown only once a run has taken more than ``delay`` seconds; without tqdm,
    plain lines on stderr after the same delay."""

    def __init__(self, total: int, enabled: bool = True, delay: float = 2.0):
        self.total, self.done, self.enabled, self.delay = total, 0, enabled, delay
        self.t0 = time.time()
        self.bar = None
        self.last_line = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self.bar = None
            else:
                try:
                    self.bar = tqdm(total=total, delay=delay, file=sys.stderr, unit="run", dynamic_ncols=True)
                except TypeError:  # tqdm < 4.59 has no delay
                    self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(label[:60], refresh=False)
            self.bar.update(1 if self.done else 0)
        else:
            now = time.time()
            if now - self.t0 > self.delay and now - self.last_line > 1.0:
                print(f"[{self.done}/{self.total} {now - self.t0:6.1f}s] {label}", file=sys.stderr, flush=True)
                self.last_line = now
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


def progress_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ runner

def run_bench(shapes: list[Shape], providers, device: str, modes=MODES, *, out_dir: str | None = None,
              budget_s: float | None = None, progress: bool = True, plots: bool = True,
              compile_backend: str = "inductor", timer=None, log=print, meta_extra: dict | None = None,
              untimed=(), model_bench: bool = False):
    """Runs every shape (most important first: a time budget cuts the tail), writing bench.json after
    each shape, then bench.md and the plots. ``untimed`` providers are validated and their bytes
    measured, not timed; ``model_bench`` adds the whole-model saved bytes (:func:`model_saved_bytes`).
    Returns (rows, meta, files written)."""
    meta = {**env_info(), "providers": list(providers), "modes": list(modes), "compile_backend": compile_backend,
            "shapes_total": len(shapes), **(meta_extra or {})}
    if device != "cuda":
        meta["note"] = CPU_NOTE
    files: list[str] = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    deadline = time.time() + budget_s if budget_s else None
    bar = _Progress(len(shapes) * len(providers), enabled=progress)
    if progress and bar.bar is None:
        log("(tqdm is not installed: progress as plain lines on stderr; pip install tqdm for a bar)")
    rows: list[Row] = []
    done = 0
    try:
        for shape in shapes:
            if deadline is not None and time.time() > deadline:
                log(f"time budget of {budget_s:.0f} s reached after {done}/{len(shapes)} shapes")
                break
            save = None
            if out_dir:
                def save(shape_rows, done_rows=list(rows)):  # a kill mid-shape keeps the providers done
                    write_results(done_rows + shape_rows, os.path.join(out_dir, "bench.json"), meta)
            rows += run_shape(shape, providers, device, modes, timer=timer, compile_backend=compile_backend,
                              deadline=deadline, on_provider=lambda s, p: bar.step(f"{s} {p}"), on_rows=save,
                              untimed=untimed)
            done += 1
            meta["shapes_done"] = done
            if out_dir:
                write_results(rows, os.path.join(out_dir, "bench.json"), meta)
    finally:
        bar.close()
    meta["shapes_done"] = done
    if model_bench:
        meta["model_saved"] = model_saved_bytes()
    if out_dir:
        path = os.path.join(out_dir, "bench.json")
        write_results(rows, path, meta)
        files.append(path)
        md = os.path.join(out_dir, "bench.md")
        with open(md, "w") as f:
            f.write(report_markdown(rows, meta))
        files.append(md)
        if plots:
            files += write_plots(rows, out_dir, log=log, cpu=device != "cuda", meta=meta)
    return rows, meta, files

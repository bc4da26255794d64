"""Multi-adapter benchmark: one layer serving many adapters in one batch (issue 18).

Scenarios: n adapters (2–64), rows spread uniformly or skewed (Zipf-like: adapter i gets a share
∝ 1/(i+1)), decode-sized (one token per request) or prefill-sized (several hundred tokens per
request), plus rows without adapter (a tenth of the requests ask for the base model).

Providers (each checked against the float64 oracle ``mixed_batch_ref`` before it is timed):
    base        F.linear(x, W, b) alone: the floor
    peft_loop   PEFT's mixed-batch algorithm (peft/tuners/lora/layer.py ``_mixed_batch_forward``),
                re-expressed in plain torch: per adapter a boolean row index, a gather, two thin
                matmuls and an indexed add
    merge_each  merging one adapter at a time: per adapter W' = W + s·B·A, then its rows through
                F.linear(x_rows, W') (what serving by weight swapping costs when a batch mixes adapters)
    multi_torch lora_kernels.multi, torch path
    multi_triton lora_kernels.multi, kernel path (cuBLAS base + one segmented shrink + one expand
                launch); CUDA only unless --allow-interpreter (then it is the CPU interpreter)

CPU timings are labelled ``cpu`` and say nothing about GPU speed. ``modeled_us`` is a roofline
estimate of the kernel path (bytes / HBM bandwidth vs flops / peak, the larger), labelled as a
model with its constants; it is not a measurement.

    python -m lora_kernels.multi.bench --preset cpu --json multi.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# Roofline constants for ``modeled_us`` (H200 SXM datasheet figures; a model, not a measurement)
MODEL_HBM_BYTES_PER_S = 4.8e12
MODEL_PEAK_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}


@dataclass
class Scenario:
    n_adapters: int
    rows: int            # requests (batch rows)
    tokens: int          # tokens per request (1 = decode)
    k: int
    n: int
    rank: int
    skew: str            # "uniform" | "zipf"
    dtype: str = "float32"

    @property
    def m(self) -> int:
        return self.rows * self.tokens

    def label(self) -> str:
        kind = "decode" if self.tokens == 1 else f"prefill{self.tokens}"
        return f"{self.n_adapters}ad {self.skew} {self.rows}x{kind} K{self.k} N{self.n} r{self.rank} {self.dtype}"


def presets() -> dict[str, list[Scenario]]:
    gpu = [Scenario(n, rows, t, 4096, 4096, 16, skew, "bfloat16")
           for n in (2, 8, 16, 64) for skew in ("uniform", "zipf") for rows, t in ((64, 1), (16, 512))]
    cpu = [Scenario(n, rows, t, 256, 256, 8, skew)
           for n in (2, 16, 64) for skew in ("uniform", "zipf") for rows, t in ((64, 1), (8, 32))]
    tiny = [Scenario(n, 16, t, 32, 48, 4, skew) for n in (2, 4) for skew in ("uniform", "zipf") for t in (1, 4)]
    return {"gpu": gpu, "cpu": cpu, "tiny": tiny}


def request_adapters(s: Scenario, generator: torch.Generator) -> torch.Tensor:
    """One adapter index per request (−1 for about a tenth: the base model)."""
    if s.skew == "uniform":
        probs = torch.ones(s.n_adapters)
    elif s.skew == "zipf":
        probs = 1.0 / torch.arange(1, s.n_adapters + 1, dtype=torch.float64)
    else:
        raise ValueError(f"skew must be 'uniform' or 'zipf', got {s.skew!r}")
    idx = torch.multinomial(probs / probs.sum(), s.rows, replacement=True, generator=generator)
    base = torch.rand(s.rows, generator=generator) < 0.1
    return torch.where(base, torch.full_like(idx, -1), idx)


def make_case(s: Scenario, device):
    from .store import AdapterSpec

    g = torch.Generator().manual_seed(1234)
    dtype = getattr(torch, s.dtype)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    x = rnd(s.m, s.k)
    w = rnd(s.n, s.k, std=s.k ** -0.5)
    b = rnd(s.n)
    specs = []
    for i in range(s.n_adapters):
        a, bb = rnd(s.rank, s.k, std=s.k ** -0.5), rnd(s.n, s.rank, std=s.rank ** -0.5)
        specs.append(AdapterSpec(f"a{i}", a, (lambda bb=bb: bb), 2.0, 0.0, None, (a, bb)))
    per_request = request_adapters(s, g)
    row_adapter = per_request.repeat_interleave(s.tokens).to(device)
    return x, w, b, specs, row_adapter


def peft_loop(x, w, b, specs, row_adapter):
    """PEFT's mixed-batch algorithm in plain torch (see the module docstring)."""
    y = F.linear(x, w, b)
    for i in torch.unique(row_adapter).tolist():
        if i < 0:
            continue
        sel = row_adapter == i
        s = specs[i]
        y[sel] += (x[sel] @ s.lora_a.t()) @ s.lora_b().t() * s.scale
    return y


def merge_each(x, w, b, specs, row_adapter):
    y = F.linear(x, w, b)
    for i in torch.unique(row_adapter).tolist():
        if i < 0:
            continue
        sel = (row_adapter == i).nonzero().flatten()
        s = specs[i]
        merged = torch.addmm(w, s.lora_b(), s.lora_a, alpha=s.scale)
        y.index_copy_(0, sel, F.linear(x.index_select(0, sel), merged, b))
    return y


class _Owner:  # something to cache the stack on, as a layer would
    pass


def providers(device, allow_interpreter: bool):
    from .functional import multi_adapter_linear

    owner = _Owner()
    out = {
        "base": lambda x, w, b, specs, idx: F.linear(x, w, b),
        "peft_loop": peft_loop,
        "merge_each": merge_each,
        "multi_torch": lambda x, w, b, specs, idx: multi_adapter_linear(x, w, b, specs, row_adapter=idx,
                                                                        backend="torch"),
    }
    if device.type == "cuda" or allow_interpreter:
        out["multi_triton"] = lambda x, w, b, specs, idx: multi_adapter_linear(
            x, w, b, specs, row_adapter=idx, backend="triton", owner=owner)
    return out


def modeled_us(s: Scenario, present_adapters: int) -> float:
    """Roofline model of the kernel path: base GEMM + shrink + expand (bytes and flops), microseconds."""
    e = torch.tensor([], dtype=getattr(torch, s.dtype)).element_size()
    m, k, n, r = s.m, s.k, s.n, s.rank
    base_bytes = (n * k + m * k + m * n) * e
    shrink_bytes = (m * k + present_adapters * r * k + m * r) * e
    expand_bytes = (m * r + present_adapters * n * r + 2 * m * n) * e
    flops = 2 * m * k * n + 2 * m * r * (k + n)
    peak = MODEL_PEAK_FLOPS[getattr(torch, s.dtype)]
    return 1e6 * (max((base_bytes) / MODEL_HBM_BYTES_PER_S, 2 * m * k * n / peak)
                  + max((shrink_bytes + expand_bytes) / MODEL_HBM_BYTES_PER_S, 2 * m * r * (k + n) / peak))


def _time(fn, device, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def run(scenarios, device="cpu", reps=5, allow_interpreter=False, log=print) -> list[dict]:
    from .reference import mixed_batch_ref
    from .store import AdapterSpec
    from ..testing import TOLERANCES, rel_error

    device = torch.device(device)
    rows = []
    for s in scenarios:
        x, w, b, specs, idx = make_case(s, device)
        specs64 = [AdapterSpec(p.name, p.lora_a.double(), (lambda p=p: p.lora_b().double()), p.scale, 0.0, None, ())
                   for p in specs]
        ref = mixed_batch_ref(x.double(), w.double(), b.double(), specs64, idx)
        present = len([i for i in torch.unique(idx).tolist() if i >= 0])
        for name, fn in providers(device, allow_interpreter).items():
            with torch.no_grad():
                call = lambda fn=fn: fn(x, w, b, specs, idx)  # noqa: E731
                if name != "base":
                    err = rel_error(call(), ref)
                    if not err < TOLERANCES[x.dtype]:
                        raise AssertionError(f"{name} on {s.label()}: error {err:.2e} above the tolerance")
                times = _time(call, device, reps)
            row = dict(asdict(s), scenario=s.label(), provider=name, device=device.type, threads=torch.get_num_threads(),
                       timing="cuda-events" if device.type == "cuda" else "cpu (not a GPU figure)",
                       median_ms=statistics.median(times), times_ms=times, adapters_present=present,
                       modeled_kernel_path_us=round(modeled_us(s, present), 3),
                       model_note="roofline model (H200: 4.8 TB/s, 989 TFLOP/s bf16), not measured")
            rows.append(row)
            log(f"{s.label():<48} {name:<13} {row['median_ms']:9.3f} ms ({row['timing']})")
    return rows


def markdown(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], {})[r["provider"]] = r
    names = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| scenario | " + " | ".join(f"{n} ms" for n in names) + " | modeled kernel path µs |",
             "|---" * (len(names) + 2) + "|"]
    for sc, d in by.items():
        first = next(iter(d.values()))
        lines.append(f"| {sc} | " + " | ".join(f"{d[n]['median_ms']:.3f}" if n in d else "–" for n in names)
                     + f" | {first['modeled_kernel_path_us']} (modeled) |")
    device = rows[0]["device"] if rows else "?"
    if device != "cuda":
        lines.append("\nCPU timings (torch ops; Triton in the interpreter if present): not GPU figures.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.multi.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(presets()), default=None,
                   help="scenario list (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--adapters", help="comma-separated adapter counts, filtering the preset")
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--allow-interpreter", action="store_true",
                   help="time the kernel path on CPU in Triton's interpreter (slow; not a GPU figure)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU: 1 keeps a shared machine's timings "
                   "from being dominated by scheduling noise)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write a markdown table here")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allow_interpreter and device != "cuda":
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
    scenarios = presets()[args.preset or ("gpu" if device == "cuda" else "cpu")]
    if args.adapters:
        keep = {int(a) for a in args.adapters.split(",")}
        scenarios = [s for s in scenarios if s.n_adapters in keep]
    rows = run(scenarios, device=device, reps=args.reps, allow_interpreter=args.allow_interpreter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    table = markdown(rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

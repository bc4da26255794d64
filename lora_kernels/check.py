"""``lora-kernels check``: every path (LoRA and DoRA, forward and every gradient) against the float64
reference over a grid of cases."""
from __future__ import annotations

import json
import time

import torch

from ._triton_env import HAS_TRITON, is_interpreter
from .testing import TOLERANCES, LoraCase, compare

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# Small grid for the CPU interpreter: every masking edge, rank, dtype, p, layout.
SMALL_GRID = [
    LoraCase(70, 90, 130, 1, f32, 0.0),
    LoraCase(70, 90, 130, 8, f16, 0.1, bias=False),
    LoraCase(70, 90, 130, 12, bf16, 0.5),
    LoraCase(33, 65, 70, 16, f32, 0.1, batch=3),
    LoraCase(150, 65, 70, 64, bf16, 0.1),
    LoraCase(50, 97, 65, 64, f16, 0.5, noncontiguous=True),
    LoraCase(70, 90, 130, 8, f32, 0.0, dora=True),
    LoraCase(33, 65, 70, 16, bf16, 0.1, batch=3, dora=True),
    LoraCase(50, 97, 65, 12, f16, 0.5, bias=False, noncontiguous=True, dora=True),
]

# Larger shapes for a GPU: several tiles and splits in every dimension, and a Llama-sized one.
GPU_GRID = SMALL_GRID + [
    LoraCase(1000, 1100, 1300, 16, bf16, 0.1),
    LoraCase(777, 2048, 1536, 8, f16, 0.0, batch=2),
    LoraCase(513, 1024, 4096, 64, bf16, 0.1, noncontiguous=True),
    LoraCase(2048, 4096, 4096, 16, bf16, 0.1),
    LoraCase(1024, 1024, 4096, 256, bf16, 0.5),
    LoraCase(333, 768, 1024, 12, f32, 0.1),
    LoraCase(1000, 1100, 1300, 16, bf16, 0.1, dora=True),
    LoraCase(2048, 4096, 4096, 16, bf16, 0.0, dora=True),
    LoraCase(777, 2048, 1536, 64, f16, 0.1, noncontiguous=True, dora=True),
]


# A few seconds in the interpreter: LoRA and DoRA, with and without dropout, each dtype once.
QUICK_GRID = [
    LoraCase(70, 90, 130, 8, f32, 0.1),
    LoraCase(33, 65, 70, 16, bf16, 0.1, batch=3),
    LoraCase(50, 97, 65, 12, f16, 0.0, bias=False, noncontiguous=True),
    LoraCase(33, 65, 70, 8, f32, 0.1, dora=True),
]

GRIDS = {"quick": QUICK_GRID, "small": SMALL_GRID, "gpu": GPU_GRID}


def available_paths(device: str) -> list[str]:
    paths = ["torch"]
    if HAS_TRITON and (device == "cuda" or is_interpreter()):
        paths += ["fused", "hybrid"]
    return paths


def run_check(device: str | None = None, grid: list[LoraCase] | None = None, paths: list[str] | None = None,
              out=print, summary: bool = False, json_path: str | None = None) -> bool:
    """Validates every path on every case of ``grid`` (default: GPU_GRID on CUDA, SMALL_GRID on
    CPU) and prints a table: one row per (path, case, quantity), or with ``summary`` one row per
    (path, case) with the largest relative error over y and the gradients. Returns True when every
    error is within tolerance (a crash is a failure). ``json_path`` also writes every figure."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = grid or (GPU_GRID if device == "cuda" else SMALL_GRID)
    paths = paths or available_paths(device)
    if device == "cpu":
        where = "Triton interpreter (TRITON_INTERPRET=1)" if is_interpreter() else "no Triton paths"
        out(f"# CPU only: torch backend, Triton kernels in the {where}, on a small grid ({len(grid)} cases)")
    else:
        out(f"# {torch.cuda.get_device_name()}: every path on {len(grid)} cases")
    out("# error: ||out - ref|| / ||ref|| against the float64 reference (same inputs, same dropout mask)")
    out("# case: M tokens (BxM: x is 3-D, a batch of B sequences of M), N outputs, K inputs, r rank, dtype,")
    out("#       p dropout; +bias: with a bias; nc: x non-contiguous (a transposed view, stride along K != 1);")
    out("#       DoRA: magnitude-direction adapter. qty: y or the gradient dx, dA, dB, dm (DoRA), db (bias)")
    if summary:
        out(f"{'path':8} {'case':52} {'max rel err':>11} {'(qty)':6} {'tol':>8}  result")
    else:
        out(f"{'path':8} {'case':52} {'qty':4} {'rel err':>9} {'tol':>8}  result")
    failures, total = 0, 0
    records = []
    t0 = time.perf_counter()
    for path in paths:
        for case in grid:
            tol = TOLERANCES[case.dtype]
            try:
                errors = compare(path, case, device=device)
            except Exception as exc:  # a crash is a failure, reported in the table
                failures += 1
                total += 1
                msg = f"ERROR {type(exc).__name__}: {exc}".splitlines()[0]
                records.append({"path": path, "case": str(case), "error": msg, "tol": tol, "ok": False})
                if summary:
                    out(f"{path:8} {str(case):52} {'-':>11} {'-':6} {tol:8.0e}  {msg}")
                else:
                    out(f"{path:8} {str(case):52} {'-':4} {'-':>9} {tol:8.0e}  {msg}")
                continue
            oks = {q: err <= tol for q, err in errors.items()}  # False for NaN too
            failures += sum(not ok for ok in oks.values())
            total += len(errors)
            records.append({"path": path, "case": str(case), "errors": errors, "tol": tol, "ok": all(oks.values())})
            if summary:
                worst = max(errors, key=lambda q: (errors[q] != errors[q], errors[q]))  # NaN first
                out(f"{path:8} {str(case):52} {errors[worst]:11.2e} {'(' + worst + ')':6} {tol:8.0e}  "
                    f"{'pass' if all(oks.values()) else 'FAIL'}")
            else:
                for qty, err in errors.items():
                    out(f"{path:8} {str(case):52} {qty:4} {err:9.2e} {tol:8.0e}  {'pass' if oks[qty] else 'FAIL'}")
    seconds = time.perf_counter() - t0
    out(f"# {total - failures}/{total} within tolerance in {seconds:.1f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "paths": paths, "seconds": seconds, "failures": failures,
                       "results": records}, f, indent=1)
    return failures == 0

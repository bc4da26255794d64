"""``lora-kernels check``: every path (LoRA and DoRA, forward and every gradient) against the float64
reference over a grid of cases."""
from __future__ import annotations

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


def available_paths(device: str) -> list[str]:
    paths = ["torch"]
    if HAS_TRITON and (device == "cuda" or is_interpreter()):
        paths += ["fused", "hybrid"]
    return paths


def run_check(device: str | None = None, grid: list[LoraCase] | None = None, paths: list[str] | None = None,
              out=print) -> bool:
    """Prints one row per (path, case, quantity); returns True when every error is within tolerance."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = grid or (GPU_GRID if device == "cuda" else SMALL_GRID)
    paths = paths or available_paths(device)
    if device == "cpu":
        where = "Triton interpreter (TRITON_INTERPRET=1)" if is_interpreter() else "no Triton paths"
        out(f"# CPU only: torch backend, Triton kernels in the {where}, on a small grid")
    else:
        out(f"# {torch.cuda.get_device_name()}: every path on {len(grid)} cases")
    out(f"{'path':8} {'case':52} {'qty':4} {'rel err':>9} {'tol':>8}  result")
    failures = 0
    t0 = time.perf_counter()
    for path in paths:
        for case in grid:
            try:
                errors = compare(path, case, device=device)
            except Exception as exc:  # a crash is a failure, reported in the table
                failures += 1
                out(f"{path:8} {str(case):52} {'-':4} {'-':>9} {'-':>8}  ERROR {type(exc).__name__}: {exc}")
                continue
            tol = TOLERANCES[case.dtype]
            for qty, err in errors.items():
                ok = err <= tol  # False for NaN too
                failures += not ok
                out(f"{path:8} {str(case):52} {qty:4} {err:9.2e} {tol:8.0e}  {'pass' if ok else 'FAIL'}")
    total = sum(4 + c.bias + c.dora for c in grid) * len(paths)
    out(f"# {total - failures}/{total} within tolerance in {time.perf_counter() - t0:.1f} s")
    return failures == 0

"""``lora-kernels check``: every kernel family against the float64 reference over a grid of cases.

The families (their cases, paths and references) live in :mod:`lora_kernels.checks`: single-adapter
LoRA/DoRA, several adapters, 4-bit weights and projection groups. Per case, fresh random inputs and
the reference are drawn once, then every path runs on them; ``torch.empty`` hands out NaN-filled
buffers meanwhile (:func:`lora_kernels.checks.base.nan_empty`), so an element no kernel wrote fails.
"""
from __future__ import annotations

import json
import time

import torch

from ._triton_env import is_interpreter
from .checks import FAMILY_NAMES, family as get_family
from .checks.base import nan_empty
from .checks.lora import GPU_GRID, QUICK_GRID, SMALL_GRID  # noqa: F401  (the lora family's grids)
from .testing import TOLERANCES  # noqa: F401  (one table for every family)

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
GRID_NAMES = ("quick", "small", "gpu")


def select_paths(fam, device: str, paths: list[str] | None) -> list[str]:
    """The family's paths to run: those available on ``device``, or those of ``paths`` it has (an
    explicitly asked path runs even where it cannot, and fails)."""
    if paths is None:
        return fam.available(device)
    return [p for p in paths if p in fam.all_paths]


def _worst(errors: dict[str, float]) -> str:
    return max(errors, key=lambda q: (errors[q] != errors[q], errors[q]))  # NaN first


def _run_family(fam, cases, paths, device, out, summary, deadline=None) -> tuple[int, int, list[dict], list]:
    """Every path on every case (none but the first started after ``deadline``, so every family is
    validated on at least one case): (failures, total, records, the cases not run)."""
    width = max(len(str(c)) for c in cases)
    if summary:
        out(f"{'family':6} {'path':7} {'case':{width}} {'max rel err':>11} {'(qty)':7} {'tol':>8}  result")
    else:
        out(f"{'family':6} {'path':7} {'case':{width}} {'qty':5} {'rel err':>9} {'tol':>8}  result")
    failures, total, records = 0, 0, []
    for done, case in enumerate(cases):
        if done > 0 and deadline is not None and time.perf_counter() > deadline:
            skipped = cases[done:]
            out(f"# {fam.name}: --budget spent: {len(skipped)} of {len(cases)} cases not run: "
                + "; ".join(str(c) for c in skipped))
            return failures, total, records, skipped
        try:
            with nan_empty():
                prepared = fam.prepare(case, device)
        except Exception as exc:  # the inputs or the reference failed: every path of the case fails
            prepared = exc
        for path in paths:
            row = f"{fam.name:6} {path:7} {str(case):{width}}"
            tol = fam.tolerance(path, case)
            try:
                if isinstance(prepared, Exception):
                    raise prepared
                with nan_empty():
                    errors = fam.run(path, case, prepared, device)
            except Exception as exc:  # a crash is a failure, reported in the table
                failures += 1
                total += 1
                msg = f"ERROR {type(exc).__name__}: {exc}".splitlines()[0]
                records.append({"family": fam.name, "path": path, "case": str(case), "error": msg, "tol": tol,
                                "ok": False})
                dashes = f"{'-':>11} {'-':7}" if summary else f"{'-':5} {'-':>9}"
                out(f"{row} {dashes} {tol:8.0e}  {msg}")
                continue
            oks = {q: err <= tol for q, err in errors.items()}  # False for NaN too
            failures += sum(not ok for ok in oks.values())
            total += len(errors)
            records.append({"family": fam.name, "path": path, "case": str(case), "errors": errors, "tol": tol,
                            "ok": all(oks.values())})
            if summary:
                worst = _worst(errors)
                out(f"{row} {errors[worst]:11.2e} {'(' + worst + ')':7} {tol:8.0e}  "
                    f"{'pass' if all(oks.values()) else 'FAIL'}")
            else:
                for qty, err in errors.items():
                    out(f"{row} {qty:5} {err:9.2e} {tol:8.0e}  {'pass' if oks[qty] else 'FAIL'}")
    return failures, total, records, []


def run_check(device: str | None = None, grid: str | None = None, paths: list[str] | None = None,
              families: list[str] | None = None, out=print, summary: bool = False,
              json_path: str | None = None, budget: float | None = None) -> bool:
    """Validates every path of every family (default: all of :data:`lora_kernels.checks.FAMILY_NAMES`)
    on the cases of ``grid`` ('quick', 'small' or 'gpu'; default: gpu on CUDA, small on CPU) and
    prints one table per family: one row per (path, case, quantity), or with ``summary`` one row per
    (path, case) with the largest error; then one summary line per family. Returns True when every
    error is within tolerance (a crash is a failure). ``json_path`` also writes every figure (rewritten
    after each family, so a run killed midway keeps the finished families). ``budget``: seconds; family
    i of n starts no case but its first after i+1 n-ths of it (time a family leaves unused passes on):
    every family runs at least its first case, even past the budget, and the cases not run are listed
    by name, not counted as failures."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = grid or ("gpu" if device == "cuda" else "small")
    if grid not in GRID_NAMES:
        raise ValueError(f"grid must be one of {', '.join(GRID_NAMES)}, got {grid!r}")
    names = list(families or FAMILY_NAMES)
    fams = [get_family(n) for n in names]  # raises on an unknown family, before anything runs
    known = {p for f in fams for p in f.all_paths}
    for p in paths or []:
        if p not in known:
            raise ValueError(f"unknown path {p!r}: the families {', '.join(names)} have the paths {', '.join(sorted(known))}")
    if device == "cpu":
        where = "Triton interpreter (TRITON_INTERPRET=1)" if is_interpreter() else "no Triton paths"
        out(f"# CPU only: torch backend, Triton kernels in the {where}, on the {grid} grid")
    else:
        out(f"# {torch.cuda.get_device_name()}: every path on the {grid} grid")
    out("# error: ||out - ref|| / ||ref|| against the float64 reference (same inputs, same dropout mask);")
    out("#        output buffers start NaN-filled, so an element no kernel wrote cannot pass")
    t0 = time.perf_counter()
    failures, total, records, per_family = 0, 0, [], {}

    def write_json():
        if json_path:
            run_paths = list(dict.fromkeys(p for r in per_family.values() for p in r["paths"]))
            with open(json_path, "w") as f:
                json.dump({"device": device, "grid": grid, "paths": run_paths, "families": per_family,
                           "seconds": time.perf_counter() - t0, "failures": failures, "results": records}, f,
                          indent=1)

    for i, fam in enumerate(fams):
        cases, fam_paths = fam.grids[grid], select_paths(fam, device, paths)
        if not fam_paths:
            out(f"## {fam.name}: skipped (none of its paths {', '.join(fam.all_paths)} selected)")
            continue
        out(f"## {fam.name}: {fam.title}; {len(cases)} cases; paths {', '.join(fam_paths)}")
        for line in fam.legend:
            out(f"# {line}")
        t = time.perf_counter()
        deadline = None if budget is None else t0 + budget * (i + 1) / len(fams)
        f_fail, f_total, f_records, skipped_cases = _run_family(fam, cases, fam_paths, device, out, summary,
                                                                deadline)
        not_run = len(skipped_cases)
        seconds = time.perf_counter() - t
        verdict = "all within tolerance" if f_fail == 0 else f"FAILED: {f_fail} not within tolerance"
        skipped = f", {not_run} not run" if not_run else ""
        out(f"# {fam.name}: {f_total - f_fail}/{f_total} {verdict} ({len(cases) - not_run} cases x {len(fam_paths)} "
            f"paths{skipped}, {seconds:.1f} s)")
        per_family[fam.name] = {"paths": fam_paths, "cases": len(cases), "not_run": not_run,
                                "not_run_cases": [str(c) for c in skipped_cases],
                                "passed": f_total - f_fail, "total": f_total, "seconds": seconds}
        failures, total, records = failures + f_fail, total + f_total, records + f_records
        write_json()
    seconds = time.perf_counter() - t0
    failed = [n for n, r in per_family.items() if r["passed"] < r["total"]]
    if failed:
        out(f"# FAILED families: {', '.join(failed)}")
    not_run = sum(r["not_run"] for r in per_family.values())
    out(f"# {total - failures}/{total} within tolerance in {seconds:.1f} s"
        + (f" ({not_run} cases not run: --budget)" if not_run else ""))
    write_json()
    return failures == 0 and total > 0  # a check that ran nothing validated nothing

"""The layer bench's run loop: :func:`run_shape` (validate, time and measure every provider at one
shape) and :func:`run_bench` (every shape, within a time budget, writing bench.json after each shape,
then bench.md and the plots). The harness behind ``lora-kernels bench``, ``bench/gpu_suite.py`` and
``bench/test_bench_providers.py``.

Figures per row: every timed repetition, median and 20th/80th percentiles, time relative to the
floor and speed-up over each baseline measured in the same process, TFLOP/s, peak CUDA memory of one
fwd+bwd above the inputs, and bytes saved for backward beyond x and the parameters.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict

import torch

from .env import env_info
from .measure import CPU_MIN_REPS, CPU_MAX_SPREAD, _peak_mem_mb, make_timer, saved_bytes, _percentile
from .model_saved import model_saved_bytes
from .plots import write_plots
from .progress import _Progress
from .providers import THEIRS, Unavailable, make_problem, provider_fn
from .report import CPU_NOTE, report_markdown, write_results
from .rows import MODES, Row, add_ratios
from .shapes import Shape
from .validation import VALIDATION_TOL, validate


UNTIMED_REASON = "Triton interpreter (CPU): validated and bytes measured, not timed"


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
            rows.append(Row(sd, provider, "skipped" if provider in THEIRS else "invalid", extra={"reason": reason}))
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
            rows.append(Row(sd, provider, "skipped" if provider in THEIRS or oom else "invalid",
                            extra={"reason": f"{type(exc).__name__}: {exc}"[:300]}))
            continue
        for row in prov_rows:
            row.peak_mem_mb, row.saved_bytes = peak, sbytes
        rows += prov_rows
        del made, fn, params
    add_ratios(rows)
    return rows


# ------------------------------------------------------------------------------------------ runner

def run_bench(shapes: list[Shape], providers, device: str, modes=MODES, *, out_dir: str | None = None,
              budget_s: float | None = None, progress: bool = True, plots: bool = True,
              compile_backend: str = "inductor", timer=None, log=print, meta_extra: dict | None = None,
              untimed=(), model_bench: bool = False):
    """Runs every shape (most important first: a time budget cuts the tail), writing bench.json after
    each shape, then bench.md and the plots. ``untimed`` providers are validated and their bytes
    measured, not timed; ``model_bench`` adds the whole-model saved bytes (:func:`model_saved_bytes`).
    Returns (rows, meta, files written)."""
    meta = {**env_info(device), "providers": list(providers), "modes": list(modes), "compile_backend": compile_backend,
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

"""Compile-level performance report: what the kernels cost, read from their binaries, without a GPU.

- :mod:`.capture`   records the launches of the real forward+backward (Triton kernels, aten ops)
- :mod:`.compile`   compiles each recorded Triton launch for sm_90a / sm_80 (Triton's own pipeline)
- :mod:`.sass`      ptxas -v and the SASS: registers, spills, occupancy, MMA kind, TMA, loop sizes
- :mod:`.roofline`  the per-launch time model, and the eager and frozen-base patterns
- :mod:`.report`    ``lora-kernels inspect``: JSON and markdown

Every time and ratio produced here is **modeled**, never measured.
"""
from __future__ import annotations


def modeled_ratios(report: dict | str | None = None, **opts) -> list[dict]:
    """Modeled fwd+bwd time ratios vs the frozen base, one dict per (shape, p, path, efficiency).

    ``report``: a report dict or the path of a ``report.json`` from ``lora-kernels inspect``; if None
    the inspection runs now (compiles kernels: tens of seconds) with ``opts`` (see
    :func:`lora_kernels.perf.report.run`). Keys: projection, M, N, K, r, p, dtype, kind, path
    (fused / hybrid / eager), efficiency ('ideal' = 100 % GEMM efficiency, 'realistic' = Triton 80 %
    / cuBLAS 95 %), ratio_vs_base, launches, time_us, base_us, modeled (always True).
    """
    import json

    from .report import run_isolated

    if report is None:
        report = run_isolated(**opts)
    elif isinstance(report, str):
        with open(report) as f:
            report = json.load(f)
    return [{k: v for k, v in r.items() if k != "ops"} for r in report["rows"]]


def markdown(rows: list[dict]) -> str:
    """A markdown table of :func:`modeled_ratios` rows (every figure labelled modeled)."""
    from .report import markdown as _md

    return _md(rows)


def run_inspection(**opts) -> dict:
    """The full report as a dict (runs in a clean process when Triton is in interpreter mode here)."""
    from .report import run_isolated

    return run_isolated(**opts)

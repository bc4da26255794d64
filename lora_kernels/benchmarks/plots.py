"""The layer bench's PNG plots: memory.png (saved bytes), cpu_times.png (CPU) or speedup.png (GPU)."""
from __future__ import annotations

import os

from .measure import CPU_THREADS
from .providers import PROVIDERS
from .report import _stable
from .rows import Row
from .shapes import kind_label


# one colour per provider in every panel: the default cycle (C0-C9), then two more for the 12 providers
_COLORS = {p: (f"C{i}" if i < 10 else ("#8c6d31", "#7b4173")[i - 10]) for i, p in enumerate(PROVIDERS)}


def _baseline_for(rows_of_group) -> str | None:
    have = {r.provider for r in rows_of_group if r.mode == "fwdbwd"}
    return next((b for b in ("unfused", "peft", "peft-qlora", "compile", "base") if b in have), None)


def _shape_label(sd: dict) -> str:
    kind = kind_label(sd.get("dora"), sd.get("quant"))
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
            groups.setdefault((kind_label(sd["dora"], sd.get("quant")), sd["r"], sd["dropout_p"], sd["dtype"]), []).append(r)
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

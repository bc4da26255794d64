"""Tables, JSON and the plot of the whole-model bench (:mod:`lora_kernels.benchmarks.model`)."""
from __future__ import annotations

import os

from .model import CPU_NOTE, OURS, Result, saved_ratio
from .report import dump_json
from .report import load_json as _load_json


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def hardware_line(meta: dict) -> str:
    where = f"GPU {meta['gpu']}" if meta.get("gpu") else f"CPU {meta.get('cpu') or 'unknown'}"
    return (f"{where}; {meta.get('dtype')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
            f"peft {meta.get('peft')}, lora_kernels {meta.get('lora_kernels')} "
            f"({(meta.get('git_commit') or 'no git commit')[:10]}); {meta.get('date')}")


def _spec_label(spec: dict) -> str:
    return (("LoRA" if spec["kind"] == "lora" else "DoRA") + f" p={spec['dropout']:g}"
            + (" GC" if spec["checkpointing"] else ""))


def _check_text(r: Result) -> str:
    if r.engine not in OURS:
        return "-"
    if not r.checks:
        return "n/a"
    return ", ".join(f"{k.replace('loss vs ', '=')} {'ok' if c['ok'] else 'DIFFERS'} ({c['max_rel_diff']:.1e})"
                     for k, c in r.checks.items())


def markdown_table(results: list[Result], meta: dict) -> str:
    cuda = meta.get("device") == "cuda"
    mem_head = "peak CUDA MiB" if cuda else "process RSS peak MiB"
    lines = [f"| run | engine | tokens/s median [min–max]{' (CPU)' if not cuda else ''} | vs PEFT | "
             f"saved for bwd MiB | vs PEFT | {mem_head} | losses per step | loss check (max rel diff) |",
             "|---|---|---|---|---|---|---|---|---|"]
    peft_by = {(_spec_label(r.spec)): r for r in results if r.engine == "peft" and r.error is None}
    for r in results:
        label = _spec_label(r.spec)
        if r.error:
            lines.append(f"| {label} | {r.engine} | ERROR: {r.error} | | | | | | |")
            continue
        if not r.losses and r.skipped:
            lines.append(f"| {label} | {r.engine} | skipped: {'; '.join(r.skipped.values())} | | | | | | |")
            continue
        tps = r.tokens_per_s()
        timing = f"{r.median_tps():.0f} [{min(tps):.0f}–{max(tps):.0f}]" if tps else "-"
        ref = peft_by.get(label)
        speed = f"{r.median_tps() / ref.median_tps():.2f}×" if ref is not None and r.engine != "peft" else "-"
        saved_ratio_ = (f"{r.saved_bytes / ref.saved_bytes:.3f}×" if ref is not None and r.engine != "peft"
                        and r.saved_bytes and ref.saved_bytes else "-")
        saved = _mib(r.saved_bytes) if r.saved_bytes is not None else ("n/a (GC)" if r.spec["checkpointing"] else "-")
        losses = " ".join(f"{v:.4f}" for v in r.losses)
        lines.append(f"| {label} | {r.engine} | {timing} | {speed} | {saved} | {saved_ratio_} | "
                     f"{_mib(r.peak_bytes)} | {losses} | {_check_text(r)} |")
    return "\n".join(lines)


def categories_table(results: list[Result]) -> str:
    """Saved-for-backward MiB by category, one column per (run, engine) without checkpointing."""
    cols = [r for r in results if r.saved_by_category]
    if not cols:
        return ""
    cats = []
    for r in cols:
        cats += [c for c in r.saved_by_category if c not in cats]
    head = "| category | " + " | ".join(f"{_spec_label(r.spec)} {r.engine}" for r in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(_mib(r.saved_by_category.get(c, 0)) for r in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"**{_mib(r.saved_bytes)}**" for r in cols) + " |")
    return "\n".join(lines)


def ratio_lines(results: list[Result]) -> list[str]:
    out = []
    for kind in ("lora", "dora"):
        for engine in OURS:
            ratio = saved_ratio(results, engine, kind, 0.05)
            if ratio is not None:
                out.append(f"saved-for-backward ratio {engine}/PEFT, whole model, {'LoRA' if kind == 'lora' else 'DoRA'}"
                           f" dropout 0.05: {ratio:.3f}")
    return out + group_lines(results)


def group_lines(results: list[Result]) -> list[str]:
    """What the projection groups change, per run: median tokens/s and peak memory, inject (grouped)
    over ungrouped, measured side by side in this run."""
    out = []
    for r in results:
        if r.engine != "inject" or not r.step_s or r.spec["kind"] == "dora":  # DoRA members are never grouped
            continue
        u = next((x for x in results if x.engine == "ungrouped" and x.spec == r.spec and x.step_s), None)
        if u is None:
            continue
        line = f"projection groups, {_spec_label(r.spec)}: tokens/s grouped/ungrouped {r.median_tps() / u.median_tps():.3f}"
        if r.peak_bytes and u.peak_bytes:
            line += f", peak memory grouped/ungrouped {r.peak_bytes / u.peak_bytes:.3f}"
        out.append(line)
    return out


def summary_text(results: list[Result], meta: dict) -> str:
    p = meta["preset"]
    parts = [f"# {hardware_line(meta)}"]
    if meta.get("device") != "cuda":
        parts.append(f"# {CPU_NOTE}; saved-for-backward bytes are exact on any device")
    parts.append(f"# model {p['name']}: hidden {p['hidden']}, FFN {p['intermediate']}, {p['layers']} layers, "
                 f"vocab {p['vocab']}; {meta['batch']}x{meta['seq']} tokens; r {meta['rank']}, alpha "
                 f"{meta['alpha']:g} on {', '.join(meta['targets'])}; AdamW lr {meta['lr']:g}; "
                 f"{meta['warmup_steps']} warm-up + {meta['timed_steps']} timed steps")
    parts += ["", markdown_table(results, meta), ""]
    cat = categories_table(results)
    if cat:
        parts += ["Saved for backward by category (MiB, exact; first step's forward; no checkpointing):", "", cat, ""]
    parts += [f"# {line}" for line in ratio_lines(results)]
    for label, ok in meta.get("loss_checks", {}).items():
        parts.append(f"# losses {label}: {'agree' if ok else 'DIFFER'} (inject = convert at any p; "
                     "= PEFT too at p = 0)")
    return "\n".join(parts)


def write_json(results: list[Result], meta: dict, path: str) -> None:
    dump_json(path, meta, "results", results)


def load_json(path: str) -> tuple[list[Result], dict]:
    return _load_json(path, "results", Result)


_COLORS = {"peft": "C0", "inject": "C1", "convert": "C2", "ungrouped": "C3"}


def write_plot(results: list[Result], meta: dict, path: str) -> str | None:
    """model.png: tokens/s (median, bars from min to max) and memory per run and engine."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results if r.error is None and r.step_s]
    if not ok:
        return None
    cuda = meta.get("device") == "cuda"
    labels = list(dict.fromkeys(_spec_label(r.spec) for r in ok))
    engines = [e for e in _COLORS if any(r.engine == e for r in ok)]
    width = 0.8 / len(engines)
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 3.0 * len(labels)), 5.0))
    for ei, eng in enumerate(engines):
        for ax, metric in zip(axes, ("tps", "mem")):
            xs, ys, lo, hi, labs = [], [], [], [], []
            for li, lab in enumerate(labels):
                r = next((r for r in ok if r.engine == eng and _spec_label(r.spec) == lab), None)
                if r is None:
                    continue
                if metric == "tps":
                    tps = r.tokens_per_s()
                    y = r.median_tps()
                    lo.append(y - min(tps))
                    hi.append(max(tps) - y)
                else:
                    val = r.peak_bytes if cuda else r.saved_bytes
                    if val is None:
                        continue
                    y = val / 2**20
                xs.append(li + (ei - (len(engines) - 1) / 2) * width)
                ys.append(y)
                labs.append(lab)
            if not xs:
                continue
            kw = {"yerr": [lo, hi], "capsize": 3} if metric == "tps" else {}
            ax.bar(xs, ys, width=width, label=eng, color=_COLORS[eng], **kw)
            if eng != "peft":  # ratio to PEFT above each bar
                tops = [y + h for y, h in zip(ys, hi)] if metric == "tps" else ys  # above the error bar
                for x, y, top, lab in zip(xs, ys, tops, labs):
                    ref = next((r for r in ok if r.engine == "peft" and _spec_label(r.spec) == lab), None)
                    ref_y = (ref.median_tps() if metric == "tps" else
                             ((ref.peak_bytes if cuda else ref.saved_bytes) or 0) / 2**20) if ref else 0
                    if ref_y:
                        ax.text(x, top, f"{y / ref_y:.2f}×", ha="center", va="bottom", fontsize=7)
    for li, lab in enumerate(labels):  # memory not measured (checkpointing on CPU): say so
        if not any(_spec_label(r.spec) == lab and (r.peak_bytes if cuda else r.saved_bytes) is not None for r in ok):
            axes[1].text(li, 0, "not measured\n(checkpointing)", ha="center", va="bottom", fontsize=7)
    where = f"{meta['gpu']}" if cuda else f"CPU ({meta.get('cpu')})"
    p = meta["preset"]
    axes[0].set_title(f"training throughput, tokens/s (median; bars: min–max)\nmeasured on {where}, {meta['dtype']}"
                      + ("\n" + CPU_NOTE if not cuda else ""), fontsize=9)
    axes[0].set_ylabel("tokens / s")
    axes[1].set_title(("peak CUDA memory, MiB (max_memory_allocated)" if cuda else
                       "saved for backward, MiB (exact; runs without checkpointing)")
                      + f"\nmeasured on {where}, {meta['dtype']}", fontsize=9)
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab.replace(" ", "\n") for lab in labels], fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"lora-kernels bench --model {p['name']}: {p['layers']} layers, hidden {p['hidden']}, "
                 f"{meta['tokens']} tokens, r {meta['rank']}, all 7 projections; {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: list[Result], meta: dict, out_dir: str, plots: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    name = f"model_{meta['preset']['name']}"
    files = []
    jpath = os.path.join(out_dir, name + ".json")
    write_json(results, meta, jpath)
    files.append(jpath)
    mpath = os.path.join(out_dir, name + ".md")
    with open(mpath, "w") as f:
        f.write(f"# lora-kernels bench --model {meta['preset']['name']}\n\n" + summary_text(results, meta) + "\n")
    files.append(mpath)
    if plots:
        png = write_plot(results, meta, os.path.join(out_dir, name + ".png"))
        if png:
            files.append(png)
    return files

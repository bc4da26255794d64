"""The layer bench's text output: markdown tables (summary, validation, saved bytes, CPU timings,
every figure), the CPU report with its modeled GPU section, bench.md, and bench.json."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from .measure import CPU_MAX_SPREAD, CPU_THREADS
from .providers import BASELINES, OUR_PROVIDERS, OUR_QUANT_PROVIDERS, PROVIDERS, floor_of
from .rows import TIMED, Row
from .shapes import shape_key


CPU_NOTE = ("CPU run: timings on CPU say nothing about GPU speed (the Triton paths run in Triton's "
            "CPU interpreter and are validated, not timed); the saved-for-backward bytes are exact on any device.")


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
    """The fastest of our timed providers (torch, fused, hybrid, or their 4-bit twins on a 4-bit
    shape: every one that was timed), else, for the bytes, the first of ours validated without timing."""
    ours = OUR_PROVIDERS + OUR_QUANT_PROVIDERS  # a shape has one family or the other
    timed = [d[p] for p in ours if p in d and d[p].mode == "fwdbwd"]
    if timed:
        return min(timed, key=lambda r: r.ms_median)
    return next((d[p] for p in ours if p in d and d[p].mode == "saved"), None)


EAGER = ("unfused", "peft", "peft-qlora")  # the eager baseline whose saved bytes are compared with ours


def markdown_table(rows: list[Row]) -> str:
    """Summary: one line per shape with the fwd+bwd median of each provider, the best of ours (fused /
    hybrid, else torch) relative to the floor (bitsandbytes' 4-bit layer on a 4-bit shape), its
    speed-up over each baseline, and the bytes saved for backward by ours and by the eager baseline
    (unfused; PEFT for DoRA; PEFT QLoRA on a 4-bit shape)."""
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
        base = d.get(floor_of(best.provider)) if best is not None else None
        r1 = (f"{best.ms_median / base.ms_median:.3g}× ({best.provider})" if timed and base and base.mode == "fwdbwd"
              else "-")
        ratios = []
        for bl in baselines:
            other = d.get(bl)
            ratios.append(f"{other.ms_median / best.ms_median:.3g}×" if timed and other and other.mode == "fwdbwd"
                          else "-")
        eager = next((d[e] for e in EAGER if e in d and d[e].saved_bytes is not None), None)
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


def quant_saved_lines(by_shape: dict) -> list[str]:
    """Under the saved-bytes table, one line per 4-bit shape: ours (QLoRA) against PEFT's QLoRA layer."""
    lines = []
    for key, d in by_shape.items():
        ours = next((d[p] for p in OUR_QUANT_PROVIDERS if p in d and d[p].saved_bytes is not None), None)
        theirs = d.get("peft-qlora")
        if ours is None or theirs is None or theirs.saved_bytes is None:
            continue
        kind, name, m, _, _, r, p, dt = key
        ratio = f"{ours.saved_bytes / theirs.saved_bytes:.3g}×" if theirs.saved_bytes else "-"
        lines.append(f"- {kind} {name}, {m} tokens, r={r}, p={p}, {dt}: ours ({ours.provider}) "
                     f"{_mib(ours.saved_bytes)} vs PEFT QLoRA {_mib(theirs.saved_bytes)} ({ratio})")
    return (["4-bit shapes, ours vs PEFT QLoRA (bytes saved for backward):", *lines, ""]) if lines else []


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
            + " | " + " | ".join(f"{p} / {floor_of(p)}" for p in providers if p != "base") + " |")
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
        rel = [(f"{d[q].ms_median / d[floor_of(q)].ms_median:.3g}×"
                if q in d and floor_of(q) in d and _stable(d[q]) and _stable(d[floor_of(q)]) else "-")
               for q in providers if q != "base"]
        lines.append(f"| {kind} | {name} | {m} | {r} | {p} | {dt} | " + " | ".join(cells + rel) + " |")
    return "\n".join(lines)


def modeled_section(shapes: list[dict]) -> str:
    """The modeled GPU ratios, from the compile-level performance report (:mod:`lora_kernels.perf`):
    every launch of the real LoRA forward+backward compiled for sm_90a, its binary read, and a roofline
    model of an H200 (docs/performance-model.md). Always at the Llama-3-8B projections, M = 8192,
    r = 16, bf16, p = 0 and 0.1 (the CPU preset's small shapes would model nothing useful), so
    ``shapes`` is not used. Its caller labels the section "modeled"; nothing in it was measured."""
    del shapes
    from .. import perf
    from .._triton_env import HAS_TRITON

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
        *quant_saved_lines(by_shape),
        "## 3. CPU timings (measured on this CPU; forward + backward; they say nothing about GPU speed)", "",
        *(["The Triton paths run in Triton's CPU interpreter here: validated above, not timed.", ""]
          if any(r.extra.get("not_timed") for r in rows) else []),
        cpu_timing_table(rows), "",
        "## 4. Modeled GPU ratios (modeled, not measured)", "",
        modeled_section(shapes),
    ]
    return "\n".join(parts)


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
    baselines = [b for b in BASELINES if b != "peft-qlora" or any(r.provider == b for r in rows)]
    head = ("| kind | projection | tokens | r | p | dtype | provider | mode | median ms [p20–p80] | × floor | "
            + "".join(f"vs {b} | " for b in baselines) + "TFLOP/s | peak MiB | saved for bwd | max rel err |")
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
               for k in ["vs_base"] + [f"speedup_vs_{b}" for b in baselines]]
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


def dump_json(path: str, meta: dict, key: str, items: list) -> None:
    """``{"meta": meta, key: [dataclass as dict, ...]}`` written to a temporary file, then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, key: [asdict(r) for r in items]}, f, indent=1, default=str)
    os.replace(tmp, path)


def load_json(path: str, key: str, cls) -> tuple[list, dict]:
    with open(path) as f:
        data = json.load(f)
    return [cls(**r) for r in data[key]], data["meta"]


def write_results(rows: list[Row], path: str, meta: dict) -> None:
    """JSON of every raw figure (every timed repetition included) with the environment."""
    dump_json(path, meta, "rows", rows)


def load_results(path: str) -> tuple[list[Row], dict]:
    return load_json(path, "rows", Row)

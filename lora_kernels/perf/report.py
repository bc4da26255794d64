"""``lora-kernels inspect``: compile every launch of the real forward+backward, read the binaries,
model the time. JSON and markdown out; every time and ratio in them is *modeled*."""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile

from . import groups_model, roofline
from .hardware import GPUS

# Llama-3-8B projections: name -> (K = in_features, N = out_features)
LLAMA3_8B = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
DEFAULTS = dict(projections=list(LLAMA3_8B), tokens=[8192], ranks=[16], dropouts=[0.0, 0.1], dtypes=["bfloat16"],
                kinds=["lora"], paths=["fused", "hybrid"], targets=["sm_90a"], all_candidates=False, gpu="h200")
QUICK = dict(DEFAULTS, projections=["q/o"])
_DROP_FLAG = ("DROPOUT", "DROPPED")
# the tile one main-loop iteration covers, per kernel family (others: the two largest BLOCK_* but BLOCK_R)
ELEMENT_TILE = {"shrink": ("BLOCK_P", "BLOCK_Q"), "linear_bwd": ("BLOCK_M", "BLOCK_K"),
                "linear_fwd": ("BLOCK_M", "BLOCK_K")}


def parse_projection(text: str) -> tuple[str, int, int]:
    if text in LLAMA3_8B:
        return (text, *LLAMA3_8B[text])
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"projection: expected one of {', '.join(LLAMA3_8B)} or INxOUT (e.g. 4096x1024), "
                         f"got {text!r}") from None
    return (text, k, n)


def element_tile(launch) -> tuple[str, str] | None:
    for key, tile in ELEMENT_TILE.items():
        if key in launch.name and all(t in launch.params for t in tile):
            return tile
    blocks = sorted((k for k, v in launch.params.items() if k.startswith("BLOCK_") and k != "BLOCK_R"
                     and isinstance(v, int)), key=lambda k: -launch.params[k])
    return tuple(blocks[:2]) if len(blocks) >= 2 else None


def _dropout_flags(launch) -> dict:
    return {k: v for k, v in launch.kwargs.items() if any(f in k for f in _DROP_FLAG) and v is True}


def _twin(launch):
    """The same launch with its dropout flags off (the no-dropout binary of the same config)."""
    import copy

    twin = copy.copy(launch)
    twin.kwargs = dict(launch.kwargs, **{k: False for k in _dropout_flags(launch)})
    return twin


class Inspector:
    """Compiles and reads binaries once per (launch specialisation, target)."""

    def __init__(self, gpu, progress=None):
        from .sass import inspect_binary

        self.gpu = gpu
        self._inspect_binary = inspect_binary
        self.reports = {}  # (hash, target) -> BinaryReport
        self.progress = progress or (lambda msg: None)

    def binary(self, launch, target):
        from .compile import compile_launch

        b = compile_launch(launch, target)
        key = (b.hash, target)
        if key not in self.reports:
            self.progress(f"  read {launch.name} [{target}] {_config_text(launch)}")
            self.reports[key] = self._inspect_binary(b, self.gpu)
        return self.reports[key]

    def dropout_extra(self, launch, target, rep):
        """Extra SASS instructions per masked element, dropout on minus off (same config):
        (in the main loop, in the whole binary); (None, None) without dropout flags."""
        if not _dropout_flags(launch):
            return None, None
        tile = element_tile(launch)
        if tile is None:
            return None, None
        off = self.binary(_twin(launch), target)
        per = 32 * rep.num_warps / (launch.params[tile[0]] * launch.params[tile[1]])
        return ((rep.main_loop_instructions - off.main_loop_instructions) * per,
                (rep.instructions - off.instructions) * per)


def hazards(prob, path, insp, target, target_programs) -> dict:
    """Recompiles and re-tunes a training run would hit: a new seed (compared by binary hash at seeds
    16 and 2**33 + 7 against 1234) and a new token count within the same power-of-two bucket (the
    autotuners' cache keys at M and M - 8)."""
    import dataclasses

    from .capture import capture_problem

    out = {"seed_recompiles": [], "retunes_on_new_token_count": []}
    if prob.p > 0:
        ref = [l for l in capture_problem(prob, path, target_programs=target_programs) if l.kind == "triton"]
        ref_hash = [insp.binary(l, target).hash for l in ref]
        for seed in (16, 2**33 + 7):
            other = [l for l in capture_problem(prob, path, target_programs=target_programs, seed=seed)
                     if l.kind == "triton"]
            for l, l_ref, h in zip(other, ref, ref_hash):
                if any("seed" in k for k in l.params) and insp.binary(l, target).hash != h:
                    note = f"{l.name} ({l.stage}, seed {seed})"
                    if note not in out["seed_recompiles"]:
                        out["seed_recompiles"].append(note)
    keys = []
    for M in (prob.M, prob.M - 8):
        launches = capture_problem(dataclasses.replace(prob, M=M), path, target_programs=target_programs,
                                   autotune=True)
        keys.append([(l.name, l.stage, l.tune_key) for l in launches if l.kind == "triton" and l.candidate == 0])
    for a, b in zip(*keys):
        if a != b:
            out["retunes_on_new_token_count"].append(f"{a[0]} ({a[1]})")
    if len(keys[0]) != len(keys[1]):
        out["retunes_on_new_token_count"].append("a different number of autotuned launches")
    return out


def _config_text(launch) -> str:
    blocks = ",".join(f"{k.replace('BLOCK_', '').replace('GROUP_M', 'G')}={v}" for k, v in launch.params.items()
                      if k.startswith("BLOCK_") or k == "GROUP_M")
    return f"{blocks} w{launch.num_warps} s{launch.num_stages}"


def _flags_text(launch) -> str:
    return ",".join(k for k, v in launch.constexprs().items() if v is True) or "-"


def run(projections=None, tokens=None, ranks=None, dropouts=None, dtypes=None, kinds=None, paths=None,
        targets=None, all_candidates=False, gpu="h200", progress=None, check_hazards=True) -> dict:
    """The whole inspection in this process (Triton must not be in interpreter mode here)."""
    from .capture import Problem, capture_problem

    o = DEFAULTS
    projections = [parse_projection(p) for p in (projections or o["projections"])]
    tokens, ranks = tokens or o["tokens"], ranks or o["ranks"]
    dropouts = dropouts if dropouts is not None else o["dropouts"]
    dtypes, kinds, paths = dtypes or o["dtypes"], kinds or o["kinds"], paths or o["paths"]
    targets = targets or o["targets"]
    hw = GPUS[gpu]
    insp = Inspector(hw, progress)
    model_target = "sm_90a" if "sm_90a" in targets else targets[0]
    launches_out, binaries_used, rows, hazard_rows = [], {}, [], []
    for kind, dtype, (proj, K, N), M, r, p in itertools.product(kinds, dtypes, projections, tokens, ranks, dropouts):
        prob = Problem(proj, M, K, N, r, p, dtype, kind)
        e = {"float32": 4}.get(dtype, 2)
        costs = {}
        for path in paths:
            progress and progress(f"capture {kind} {path} {proj} M={M} r={r} p={p} {dtype}")
            launches = capture_problem(prob, path, all_candidates, 2 * hw.sms)
            costs[path] = _model_path(prob, path, launches, targets, model_target, insp, hw, launches_out,
                                      binaries_used)
            if check_hazards and not any(h["kind"] == kind and h["path"] == path and h["p"] == p
                                         for h in hazard_rows):
                progress and progress(f"recompile checks {kind} {path} p={p}")
                hazard_rows.append(dict(kind=kind, path=path, p=p, projection=proj, M=M,
                                        **hazards(prob, path, insp, model_target, 2 * hw.sms)))
        if kind == "lora":
            costs["eager"] = {scen: roofline.eager_pattern(M, N, K, r, p, e, hw, eff["cublas"])
                              for scen, eff in roofline.EFFICIENCIES.items()}
        base = {scen: roofline.base_pattern(M, N, K, e, hw, eff["cublas"])
                for scen, eff in roofline.EFFICIENCIES.items()}
        tb = {scen: sum(c.t for c in ops) for scen, ops in base.items()}
        for path, per_scen in costs.items():
            for scen, ops in per_scen.items():
                t = sum(c.t for c in ops)
                rows.append(dict(
                    prob.as_dict(), path=path, efficiency=scen, efficiency_label=roofline.EFFICIENCIES[scen]["label"],
                    launches=len(ops), time_us=t * 1e6, base_us=tb[scen] * 1e6, ratio_vs_base=t / tb[scen],
                    modeled=True, fwd_us=sum(c.t for c in ops if c.stage == "fwd") * 1e6,
                    bwd_us=sum(c.t for c in ops if c.stage == "bwd") * 1e6, ops=[c.as_dict() for c in ops]))
    binaries = sorted(binaries_used.values(), key=lambda b: (b["kernel"], b["flags"], b["config"], b["target"]))
    return dict(
        tool="lora-kernels inspect", modeled=True,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=_triton_version(), gpu=hw.as_dict(), targets=targets, model_target=model_target,
        all_candidates=all_candidates, efficiencies=roofline.EFFICIENCIES,
        binaries=binaries, launches=launches_out, rows=rows, recompiles=hazard_rows,
        projection_groups=groups_model.modeled_saving(M=tokens[0], r=ranks[0], dropouts=dropouts, gpu=hw),
        summary=dict(summarize(binaries, rows, hazard_rows), capture_devices=capture_devices(launches_out)),
    )


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:  # pragma: no cover
        return None


def _model_path(prob, path, launches, targets, model_target, insp, hw, launches_out, binaries_used):
    per_scen = {s: [] for s in roofline.EFFICIENCIES}
    groups = {}
    for launch in launches:
        entry = dict(launch.as_dict(), problem=prob.as_dict(), path=path, binaries={})
        if launch.kind == "triton":
            for target in targets:
                rep = insp.binary(launch, target)
                extra, extra_binary = insp.dropout_extra(launch, target, rep)
                key = f"{rep.hash[:12]}:{target}"
                tile = element_tile(launch)
                threads = 32 * rep.num_warps
                ipe = (rep.main_loop_instructions * threads / (launch.params[tile[0]] * launch.params[tile[1]])
                       if tile and rep.main_loop_instructions else None)
                binaries_used.setdefault(key, dict(
                    id=key, kernel=launch.name, target=target, config=_config_text(launch), flags=_flags_text(launch),
                    candidate=launch.candidate, candidates=launch.candidates,
                    registers=rep.registers, spill_stores=rep.spill_stores, spill_loads=rep.spill_loads,
                    stack_frame=rep.stack_frame, stl=rep.stl, ldl=rep.ldl, spills=rep.spills, shared=rep.shared,
                    num_warps=rep.num_warps, num_stages=rep.num_stages, ctas_per_sm=rep.ctas_per_sm,
                    occupancy_limit=rep.occupancy_limit, mma=rep.mma_kind, hgmma=rep.hgmma, hmma=rep.hmma,
                    tma=rep.tma, instructions=rep.instructions, main_loop_instructions=rep.main_loop_instructions,
                    element_tile=list(tile) if tile else None, instructions_per_element=ipe,
                    dropout_extra_per_element=extra, dropout_extra_binary_per_element=extra_binary))
                entry["binaries"][target] = key
                if target == model_target:
                    for scen, eff in roofline.EFFICIENCIES.items():
                        c = roofline.triton_cost(launch, rep, hw, eff["triton"], extra_binary)
                        c.notes.append(f"binary {key}")
                        _add(per_scen[scen], groups, scen, launch, c)
        else:
            for scen, eff in roofline.EFFICIENCIES.items():
                _add(per_scen[scen], groups, scen, launch, roofline.torch_cost(launch, hw, eff["cublas"]))
        launches_out.append(entry)
    return per_scen


def _add(ops, groups, scen, launch, cost):
    """Append a launch's cost; of an autotuned group's candidates keep the fastest modeled one."""
    if launch.group is None:
        ops.append(cost)
        return
    key = (scen, launch.group)
    if key not in groups:
        groups[key] = len(ops)
        ops.append(cost)
    elif cost.t < ops[groups[key]].t:
        ops[groups[key]] = cost


def summarize(binaries, rows, hazard_rows=()) -> dict:
    spilling = [b["id"] + " " + b["kernel"] + " " + b["config"] for b in binaries if b["spills"]]
    # the mask's cost in u = (x ⊙ Z)·Aᵀ: binaries that also store x ⊙ Z (DoRA's STORE_DROPPED) pay for
    # that store too, and are shown in the binaries table but not counted here
    extras = [b["dropout_extra_per_element"] for b in binaries
              if b["dropout_extra_per_element"] is not None and "shrink" in b["kernel"] and "DROPPED" not in b["flags"]]
    launches = {}
    for r in rows:
        if r["efficiency"] == "ideal":
            launches.setdefault((r["kind"], r["path"]), set()).add(r["launches"])
    best = {}
    for r in rows:
        if r["efficiency"] == "ideal" and r["path"] != "eager":
            k = (r["kind"], r["projection"], r["M"], r["r"], r["p"], r["dtype"])
            best[k] = min(best.get(k, float("inf")), r["ratio_vs_base"])
    out = dict(
        binaries=len(binaries), spilling_binaries=spilling,
        max_shrink_dropout_extra_per_element=max(extras) if extras else None,
        max_launches={f"{k}/{p}": max(v) for (k, p), v in launches.items()},
        best_ratio_ideal={"/".join(str(x) for x in k): v for k, v in best.items()},
        seed_recompiles=sorted({x for h in hazard_rows for x in h["seed_recompiles"]}),
        retunes_on_new_token_count=sorted({x for h in hazard_rows for x in h["retunes_on_new_token_count"]}),
    )
    out["issue13_checks"] = issue13_checks(out, rows, bool(hazard_rows))
    return out


def capture_devices(launches: list[dict]) -> dict:
    """(kind/path) -> the device the launchers ran on: cuda-fake, or meta where the fake device failed."""
    out = {}
    for l in launches:
        key = f"{l['problem']['kind']}/{l['path']}"
        out.setdefault(key, set()).add(l["params"].get("capture_device", "meta"))
    return {k: ",".join(sorted(v)) for k, v in out.items()}


def issue13_checks(s: dict, rows: list[dict], hazards_checked: bool) -> list[dict]:
    """Issue 13's "Done when" items this report can evaluate (ok None: not covered by this run)."""
    checks = []

    def add(name, ok, detail):
        checks.append(dict(check=name, ok=ok, detail=detail))

    by_target = {}
    for b in s["spilling_binaries"]:
        by_target.setdefault(b.split()[0].split(":")[1], []).append(b)
    add("no spill in any inspected sm_90a binary", not by_target.get("sm_90a"),
        f"{len(by_target.get('sm_90a', []))} spilling")
    others = {t: len(v) for t, v in by_target.items() if t != "sm_90a"}
    if others:
        add("no spill on the other targets (informational)", False, ", ".join(f"{t}: {n}" for t, n in others.items()))
    x = s["max_shrink_dropout_extra_per_element"]
    add("dropout <= 12 extra SASS instructions per element in the shrink loop", None if x is None else x <= 12,
        "not measured" if x is None else f"{x:.1f}")
    for path, bound in (("hybrid", 7), ("fused", 5)):
        n = s["max_launches"].get(f"lora/{path}")
        add(f"<= {bound} device launches for a {path} LoRA fwd+bwd", None if n is None else n <= bound,
            "not run" if n is None else str(n))
    ideal = [r for r in rows if r["kind"] == "lora" and r["efficiency"] == "ideal"]
    qo = [r for r in ideal if (r["K"], r["N"]) == (4096, 4096) and r["p"] == 0.1 and r["path"] != "eager"]
    best_qo = min((r["ratio_vs_base"] for r in qo), default=None)
    add("modeled best path <= 1.20x the frozen base at q/o, p = 0.1, 100 % GEMM efficiency",
        None if best_qo is None else best_qo <= 1.20, "not run" if best_qo is None else f"{best_qo:.2f}")
    behind = []
    for r in ideal:
        if r["path"] == "eager":
            ours = [o["ratio_vs_base"] for o in ideal if o["path"] != "eager" and o["projection"] == r["projection"]
                    and o["p"] == r["p"] and o["M"] == r["M"] and o["r"] == r["r"] and o["dtype"] == r["dtype"]]
            if ours and min(ours) >= r["ratio_vs_base"]:
                behind.append(f"{r['projection']} p={r['p']} ({min(ours):.2f} vs eager {r['ratio_vs_base']:.2f})")
    has_eager = any(r["path"] == "eager" for r in ideal)
    add("modeled best path ahead of the eager pattern at every shape (100 % GEMM efficiency)",
        None if not has_eager else not behind, "; ".join(behind) or ("ahead everywhere" if has_eager else "not run"))
    w = [op["reread"]["W"] for r in ideal if r["path"] == "fused" for op in r["ops"] if op.get("reread")]
    add("fused dx GEMM reads W <= 2x its size (modeled)", None if not w else max(w) <= 2.0,
        "no fused dx GEMM" if not w else f"max {max(w):.1f}x")
    add("a new seed never recompiles", None if not hazards_checked else not s["seed_recompiles"],
        "not checked" if not hazards_checked else ("; ".join(s["seed_recompiles"]) or "none"))
    add("a new token count (same bucket) never re-tunes", None if not hazards_checked
        else not s["retunes_on_new_token_count"],
        "not checked" if not hazards_checked else ("; ".join(s["retunes_on_new_token_count"]) or "none"))
    return checks


# -- markdown --------------------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    """A table of modeled fwd+bwd ratios (rows from :func:`lora_kernels.perf.modeled_ratios`)."""
    head = ("| projection | M | K→N | r | p | path | launches | modeled fwd+bwd (µs) | modeled base (µs) | "
            "modeled ratio vs base | efficiency |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['projection']} | {r['M']} | {r['K']}→{r['N']} | {r['r']} | {r['p']} | {r['path']} | "
                     f"{r['launches']} | {r['time_us']:.0f} | {r['base_us']:.0f} | **{r['ratio_vs_base']:.2f}** | "
                     f"{r.get('efficiency_label', r.get('efficiency', ''))} |")
    return "\n".join(lines)


def ratio_matrix(rows: list[dict]) -> str:
    """One line per (projection, p, path): the ratio at both efficiencies."""
    table = {}
    for r in rows:
        key = (r["kind"], r["projection"], r["M"], r["r"], r["p"], r["dtype"], r["path"])
        table.setdefault(key, {})[r["efficiency"]] = r
    lines = ["| kind | projection (K→N) | p | path | launches | modeled ratio, 100 % GEMM eff. | "
             "modeled ratio, Triton 80 % / cuBLAS 95 % |", "|---|---|---|---|---|---|---|"]
    for (kind, proj, M, r, p, dtype, path), d in table.items():
        any_row = next(iter(d.values()))
        lines.append(f"| {kind} | {proj} ({any_row['K']}→{any_row['N']}) | {p} | {path} | {any_row['launches']} | "
                     f"{d['ideal']['ratio_vs_base']:.2f} | {d['realistic']['ratio_vs_base']:.2f} |")
    return "\n".join(lines)


def checks_markdown(checks: list[dict]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    for c in checks:
        res = "n/a" if c["ok"] is None else ("pass" if c["ok"] else "FAIL")
        lines.append(f"| {c['check']} | {res} | {c['detail']} |")
    return "\n".join(lines)


def binaries_markdown(binaries: list[dict]) -> str:
    lines = ["| kernel | target | config | flags | regs | spill st/ld (B) | smem (KB) | CTAs/SM (limit) | MMA | TMA | "
             "main-loop instr. | instr./element | dropout extra instr./element: main loop (binary) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in binaries:
        ipe = f"{b['instructions_per_element']:.1f}" if b["instructions_per_element"] is not None else "-"
        ext = (f"{b['dropout_extra_per_element']:.1f} ({b.get('dropout_extra_binary_per_element') or 0:.1f})"
               if b["dropout_extra_per_element"] is not None else "-")
        cand = f" (cand. {b['candidate'] + 1}/{b['candidates']})" if b.get("candidate") is not None else ""
        lines.append(f"| {b['kernel']} | {b['target']} | {b['config']}{cand} | {b['flags']} | {b['registers']} | "
                     f"{b['spill_stores']}/{b['spill_loads']} | {b['shared'] / 1024:.0f} | "
                     f"{b['ctas_per_sm']} ({b['occupancy_limit']}) | {b['mma']} | {'yes' if b['tma'] else 'no'} | "
                     f"{b['main_loop_instructions']} | {ipe} | {ext} |")
    return "\n".join(lines)


def launches_markdown(report: dict, projection: str, p: float, path: str, efficiency: str = "ideal") -> str:
    row = next((r for r in report["rows"] if r["projection"] == projection and r["p"] == p and r["path"] == path
                and r["efficiency"] == efficiency), None)
    if row is None:
        return ""
    lines = [f"Launches of `{path}` at {projection}, p = {p}, M = {row['M']}, r = {row['r']} "
             f"({roofline.EFFICIENCIES[efficiency]['label']}; all times modeled):", "",
             "| stage | launch | model | GFLOP | HBM MB (compulsory) | t_mma | t_mem | t_issue | t_rng | t_crit | "
             "t (µs) | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in row["ops"]:
        lines.append(f"| {c['stage']} | {c['name']} | {c['model']} | {c['flops'] / 1e9:.1f} | "
                     f"{c['bytes_hbm'] / 1e6:.0f} ({c['bytes_compulsory'] / 1e6:.0f}) | {c['t_mma'] * 1e6:.1f} | "
                     f"{c['t_mem'] * 1e6:.1f} | {c['t_issue'] * 1e6:.1f} | {c['t_rng'] * 1e6:.1f} | "
                     f"{c.get('t_crit', 0) * 1e6:.1f} | "
                     f"{c['t'] * 1e6:.1f} | {'; '.join(c['notes'])} |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    s = report["summary"]
    g = report["gpu"]
    out = [
        "# Compile-level performance report (modeled)", "",
        f"Generated {report['date']} by `lora-kernels inspect` with triton {report['triton']}; binaries compiled for "
        f"{', '.join(report['targets'])} without a GPU. **Every time and ratio below is modeled** "
        f"({g['name']}: {g['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 dense, {g['hbm_bytes_per_s'] / 1e12:.1f} TB/s, "
        f"{g['sms']} SMs, {g['launch_overhead_s'] * 1e6:.0f} µs per launch); registers, spills, shared memory, "
        "MMA kind and instruction counts are read from the compiled binaries. See docs/performance-model.md.", "",
        "## Summary", "",
        f"- binaries inspected: {s['binaries']}; spilling: {len(s['spilling_binaries'])}"
        + (f" ({'; '.join(s['spilling_binaries'])})" if s["spilling_binaries"] else ""),
        f"- dropout cost in the shrink loop: {s['max_shrink_dropout_extra_per_element']:.1f} extra SASS instructions "
        "per element (max over the u = (x⊙Z)·Aᵀ binaries; those also storing x⊙Z for DoRA are in the table)" if s["max_shrink_dropout_extra_per_element"] is not None
        else "- dropout cost in the shrink loop: not measured (no dropout binary)",
        "- device launches per fwd+bwd: " + ", ".join(f"{k}: {v}" for k, v in s["max_launches"].items()),
        "- a new dropout seed recompiles: " + ("; ".join(s.get("seed_recompiles", [])) or "nothing"),
        "- launchers ran on: " + ", ".join(f"{k}: {v}" for k, v in s.get("capture_devices", {}).items())
        + " (cuda-fake: fake CUDA tensors with the modeled GPU's device queries; meta: the fallback)",
        "- a new token count in the same power-of-two bucket re-tunes: "
        + ("; ".join(s.get("retunes_on_new_token_count", [])) or "nothing"),
        "", "## Issue 13 checks (from this run)", "", checks_markdown(s.get("issue13_checks", [])),
        "", "## Modeled fwd+bwd time / frozen base (cuBLAS x·Wᵀ + g·W)", "", ratio_matrix(report["rows"]),
        "", "## Binaries", "", binaries_markdown(report["binaries"]), "",
    ]
    if report.get("projection_groups"):  # lora_kernels.perf.groups_model
        out += ["## Shared-input projection groups, grouped vs ungrouped (modeled, Llama-3-8B)", "",
                groups_model.markdown(report["projection_groups"]), ""]
    first = report["rows"][0] if report["rows"] else None
    if first:
        p = max(r["p"] for r in report["rows"])
        for path in dict.fromkeys(r["path"] for r in report["rows"]):
            out += [launches_markdown(report, first["projection"], p, path), ""]
    return "\n".join(out)


# -- entry points ----------------------------------------------------------------------------------------

def run_isolated(**opts) -> dict:
    """:func:`run`, in a fresh Python process when this one has Triton in interpreter mode."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return run(**opts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opts.json")
        with open(path, "w") as f:
            json.dump({k: v for k, v in opts.items() if k != "progress"}, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        res = subprocess.run([sys.executable, "-m", "lora_kernels.perf.report", "--opts-json", path],
                             env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"the inspection process failed:\n{res.stderr[-4000:]}")
        with open(path + ".out") as f:
            return json.load(f)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--projections", default=None,
                   help="comma-separated Llama-3-8B names (q/o, k/v, gate/up, down) or INxOUT; default: all four")
    p.add_argument("--tokens", default=None, help="comma-separated token counts M (default 8192)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default 16)")
    p.add_argument("--dropouts", default=None, help="comma-separated dropout rates (default 0,0.1)")
    p.add_argument("--dtypes", default=None, help="comma-separated bfloat16,float16,float32 (default bfloat16)")
    p.add_argument("--kinds", default=None, help="lora, dora or lora,dora (default lora)")
    p.add_argument("--paths", default=None, help="fused,hybrid (default both)")
    p.add_argument("--targets", default=None,
                   help="comma-separated sm_90a,sm_80 (default sm_90a; the model uses sm_90a)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="GPU figures for the model (default h200)")
    p.add_argument("--all-candidates", action="store_true",
                   help="compile every autotune candidate left after pruning (slow); default: the default configs")
    p.add_argument("--quick", action="store_true", help="q/o only (one shape, p = 0 and 0.1)")
    p.add_argument("--out", default="inspect_out", help="output folder for report.json and report.md")
    p.add_argument("--qlora", action="store_true",
                   help="add the 4-bit (NF4, nested, blocksize 64) section: lora_kernels.perf.qlora_model")


def options_from_args(args) -> dict:
    def csv(text, conv=str):
        return [conv(t.strip()) for t in text.split(",") if t.strip()] if text else None

    base = QUICK if args.quick else DEFAULTS
    opts = dict(
        projections=csv(args.projections) or base["projections"], tokens=csv(args.tokens, int),
        ranks=csv(args.ranks, int), dropouts=csv(args.dropouts, float), dtypes=csv(args.dtypes),
        kinds=csv(args.kinds), paths=csv(args.paths), targets=csv(args.targets),
        all_candidates=args.all_candidates, gpu=args.gpu,
    )
    for p in opts["projections"]:
        parse_projection(p)
    for dt in opts["dtypes"] or []:
        if dt not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtypes: {dt!r} is not one of bfloat16, float16, float32")
    for k in opts["kinds"] or []:
        if k not in ("lora", "dora"):
            raise ValueError(f"--kinds: {k!r} is not one of lora, dora")
    for p in opts["paths"] or []:
        if p not in ("fused", "hybrid"):
            raise ValueError(f"--paths: {p!r} is not one of fused, hybrid")
    from .compile import capability
    for t in opts["targets"] or []:
        try:
            capability(t)
        except ValueError as exc:
            raise ValueError(f"--targets: {exc}") from None
    return opts


def cli(args) -> int:
    """``lora-kernels inspect``: returns the exit status."""
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        print(f"lora-kernels inspect: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        report = run_isolated(**opts)
    else:
        report = run(**opts, progress=lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    md = report_markdown(report)
    if getattr(args, "qlora", False):  # the QLoRA section (lora_kernels/perf/qlora_model.py)
        from . import qlora_model

        report["qlora"] = qlora_model.run_isolated(**{k: opts[k] for k in ("projections", "tokens", "ranks", "dropouts")
                                                      if opts.get(k)}, gpu=opts["gpu"])
        md += "\n\n" + qlora_model.section_markdown(report["qlora"])
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"# wrote {os.path.join(args.out, 'report.json')}, {os.path.join(args.out, 'report.md')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.perf.report")
    p.add_argument("--opts-json", default=None, help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.opts_json:  # the isolated child of run_isolated
        with open(args.opts_json) as f:
            opts = json.load(f)
        report = run(**opts)
        with open(args.opts_json + ".out", "w") as f:
            json.dump(report, f)
        return 0
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())

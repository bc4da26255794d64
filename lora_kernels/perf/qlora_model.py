"""The compile-level report for QLoRA (a 4-bit NF4 / FP4 frozen base): compile the 4-bit kernels for
sm_90a, read their binaries, model the layer's forward+backward. Every time and ratio is *modeled*.

Three patterns per shape (Llama-3-8B projections, M tokens, rank r, dropout p):

- ``fused``: lora_kernels' fused path on a :class:`~lora_kernels.quant.QuantizedWeight` — the
  recorded launches of :mod:`lora_kernels.triton_backend` (shrink, forward GEMM decoding W in its
  K loop, v+dB, dx GEMM decoding W in its N loop), each compiled; the GEMMs are modeled as the dense
  ones (:mod:`.roofline`) with W's bytes at 4.5 bits per weight (packed nibbles + absmax), plus an
  issue bound: the decode's extra SASS per W element (main loop of the 4-bit binary minus its dense
  twin of the same config, per W element a program decodes) × the W elements all programs decode
  (each W tile once per M block of the forward, once per M block of the dx GEMM);
- ``hybrid``: lora_kernels' hybrid path — the dequant kernel writes W (bf16) into the scratch buffer
  (forward, and again in backward), then cuBLAS + the Triton LoRA kernels, all recorded and compiled;
- ``peft``: PEFT's QLoRA layer (bitsandbytes ``dequantize_4bit`` to bf16 + cuBLAS for the base, the
  LoRA branch unfused with F.dropout's masked copy saved), analytic: :func:`peft_qlora_pattern`.

The baseline is the bf16 frozen base (cuBLAS x·Wᵀ and g·W on a bf16 W). ``python -m
lora_kernels.perf.qlora_model`` prints the markdown table; ``lora-kernels inspect --qlora`` adds it
to the report.
"""
from __future__ import annotations

import math

import torch

from . import roofline
from .hardware import GPUS

QUANT_BYTES_PER_WEIGHT = 0.5  # packed nibbles
PATTERNS = ("fused", "hybrid", "peft")


def absmax_bytes_per_weight(blocksize: int, nested: bool, blocksize2: int = 256) -> float:
    """The quant state's bytes per weight: fp32 absmax per block, or (nested) one uint8 per block plus
    an fp32 per nested block."""
    return (1.0 + 4.0 / blocksize2) / blocksize if nested else 4.0 / blocksize


def _fake_quantized(N, K, quant_type, blocksize, nested, device):
    from ..quant.format import NestedAbsmax, QuantizedWeight

    numel = N * K
    blocks = math.ceil(numel / blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device)
    code = torch.empty(16, dtype=torch.float32, device=device)
    if nested:
        nest = NestedAbsmax(torch.empty(math.ceil(blocks / 256), dtype=torch.float32, device=device),
                            torch.empty(256, dtype=torch.float32, device=device), 256,
                            torch.empty((), dtype=torch.float32, device=device))
        absmax = torch.empty(blocks, dtype=torch.uint8, device=device)
    else:
        nest, absmax = None, torch.empty(blocks, dtype=torch.float32, device=device)
    return QuantizedWeight(packed, absmax, (N, K), quant_type, blocksize, code=code, dtype=torch.bfloat16, nested=nest)


def capture_qlora(problem, path: str, quant_type: str = "nf4", blocksize: int = 64, nested: bool = True,
                  target_programs: int = 264, seed: int = 1234, capability: int = 90, device: str = "auto"):
    """Record the launches of lora_kernels' 4-bit forward+backward (``fused`` or ``hybrid``) for
    ``problem`` (a :class:`.capture.Problem`, LoRA or DoRA), on fake CUDA tensors, or meta tensors
    where the fake device fails (as :func:`.capture.capture_problem`; nothing runs)."""
    import contextlib
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .. import triton_backend as tb
    from ..kernels.dequant import dequant_4bit
    from .capture import _modeled_cuda, recording

    if problem.kind not in ("lora", "dora"):
        raise ValueError(f"kind: expected 'lora' or 'dora', got {problem.kind!r}")
    if path not in ("fused", "hybrid"):
        raise ValueError(f"path: expected 'fused' or 'hybrid', got {path!r}")
    if device == "auto":
        try:
            return capture_qlora(problem, path, quant_type, blocksize, nested, target_programs, seed, capability,
                                 "cuda-fake")
        except Exception:  # noqa: BLE001 - any failure of the fake device: the meta capture
            return capture_qlora(problem, path, quant_type, blocksize, nested, target_programs, seed, capability,
                                 "meta")
    dt = getattr(torch, problem.dtype)
    M, K, N, r = problem.M, problem.K, problem.N, problem.r
    fake = device == "cuda-fake"
    env = _modeled_cuda(target_programs // 2, capability) if fake else contextlib.nullcontext()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    dev = "cuda" if fake else "meta"
    with env, mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        kw = dict(device=dev, dtype=dt)
        qw = _fake_quantized(N, K, quant_type, blocksize, nested, dev)
        x, a, b, g = torch.empty(M, K, **kw), torch.empty(r, K, **kw), torch.empty(N, r, **kw), torch.empty(M, N, **kw)
        bias = torch.empty(N, **kw) if problem.bias else None
        with recording(False, target_programs, False) as rec:
            rec.stage = "fwd"
            w = qw if path == "fused" else dequant_4bit(qw, torch.empty(N, K, **kw))
            if problem.kind == "dora":
                m = torch.empty(N, **kw)
                _, u, h, norm = tb.dora_linear_fwd(x, w, bias, a, b, m, 2.0, problem.p, seed, path)
            else:
                _, u = tb.lora_linear_fwd(x, w, bias, a, b, 2.0, problem.p, seed, path)
            rec.stage = "bwd"
            w = qw if path == "fused" else dequant_4bit(qw, torch.empty(N, K, **kw))
            if problem.kind == "dora":
                tb.dora_linear_bwd(g, x, w, a, b, m, u, h, norm, 2.0, problem.p, seed, True, path)
            else:
                tb.lora_linear_bwd(g, x, w, a, b, u, 2.0, problem.p, seed, True, path)
    return rec.launches


def _decode_cost(launch, rep, dense_rep, M, N, K, gpu, c):
    """Add the 4-bit GEMM's issue bound and its W bytes to ``c`` (a roofline cost of the same launch)."""
    threads = 32 * rep.num_warps
    if "linear_fwd" in launch.name:
        w_tile = launch.params["BLOCK_K"] * launch.params["BLOCK_N"]
        tiles_of_m = math.ceil(M / launch.params["BLOCK_M"])
    else:
        w_tile = launch.params["BLOCK_N"] * launch.params["BLOCK_K"]
        tiles_of_m = math.ceil(M / launch.params["BLOCK_M"])
    per_w = (rep.main_loop_instructions * threads) / w_tile  # whole loop body per decoded W element
    extra = ((rep.main_loop_instructions - dense_rep.main_loop_instructions) * threads) / w_tile
    decoded = N * K * tiles_of_m
    c.instructions = per_w * decoded
    c.t_issue = c.instructions / gpu.instructions_per_s
    # W bytes: the dense model counted 2 bytes per weight per read; the 4-bit read is ~4.5 bits
    ratio = (QUANT_BYTES_PER_WEIGHT + absmax_bytes_per_weight(launch.params["QBLOCK"], launch.params["NESTED"],
                                                              launch.params["QBLOCK2"])) / 2.0
    w_traffic = c.reread.get("W", 1.0) * N * K * 2.0 if c.reread else N * K * 2.0
    c.bytes_hbm -= w_traffic * (1.0 - ratio)
    c.t_mem = c.bytes_hbm / gpu.hbm_bytes_per_s
    c.notes.append(f"4-bit decode: {extra:.1f} extra SASS per decoded W element (vs the dense binary), "
                   f"loop {per_w:.1f}/W element, W decoded {tiles_of_m}x")
    c.t = max(c.t_mma + c.t_rng, c.t_mem, c.t_issue, c.t_crit) + gpu.launch_overhead_s
    return extra, per_w


def peft_qlora_pattern(M, N, K, r, p, e, blocksize, nested, gpu, eff):
    """PEFT's lora.bnb.Linear4bit: bnb dequantize_4bit (W to bf16, read 4.5 bits, write 2 bytes) then
    cuBLAS for the base, forward and backward (W is not kept), plus the unfused LoRA branch
    (roofline.eager_pattern without its two base GEMMs)."""
    qbytes = N * K * (QUANT_BYTES_PER_WEIGHT + absmax_bytes_per_weight(blocksize, nested))
    deq = lambda stage: roofline.op_cost("bnb dequantize_4bit", stage, gpu, eff,  # noqa: E731
                                         nbytes=qbytes + N * K * e)
    ops = roofline.eager_pattern(M, N, K, r, p, e, gpu, eff)
    return [deq("fwd")] + ops[:1] + [deq("bwd")] + ops[1:]


def run(projections=None, tokens=(8192,), ranks=(16,), dropouts=(0.0, 0.1), quant_type="nf4", blocksize=64,
        nested=True, gpu="h200", target="sm_90a", progress=None) -> dict:
    """Compile and model; returns dict(rows, binaries) (all figures modeled)."""
    from .capture import Problem, capture_problem, check_compilable
    from .report import LLAMA3_8B, Inspector, _config_text, _flags_text, parse_projection

    check_compilable()
    hw = GPUS[gpu]
    insp = Inspector(hw, progress)
    projections = [parse_projection(p) for p in (projections or list(LLAMA3_8B))]
    rows, binaries = [], {}

    def note_binary(launch, rep, extra=None, per_w=None):
        key = f"{rep.hash[:12]}:{target}"
        binaries.setdefault(key, dict(
            id=key, kernel=launch.name, config=_config_text(launch), flags=_flags_text(launch),
            registers=rep.registers, spills=rep.spills, spill_stores=rep.spill_stores, spill_loads=rep.spill_loads,
            mma=rep.mma_kind, hgmma=rep.hgmma, hmma=rep.hmma, main_loop_instructions=rep.main_loop_instructions,
            decode_extra_per_w=extra, loop_per_w=per_w, modeled=True))

    for (proj, K, N), M, r, p in ((a, m, rr, pp) for a in projections for m in tokens for rr in ranks
                                  for pp in dropouts):
        prob = Problem(proj, M, K, N, r, p)
        e = 2
        dense = {l.name: l for l in capture_problem(prob, "fused", target_programs=2 * hw.sms) if l.kind == "triton"}
        per_path = {}
        for path in ("fused", "hybrid"):
            progress and progress(f"capture qlora {path} {proj} M={M} r={r} p={p}")
            ops = {s: [] for s in roofline.EFFICIENCIES}
            for launch in capture_qlora(prob, path, quant_type, blocksize, nested, 2 * hw.sms):
                for scen, eff in roofline.EFFICIENCIES.items():
                    if launch.kind != "triton":
                        ops[scen].append(roofline.torch_cost(launch, hw, eff["cublas"]))
                        continue
                    rep = insp.binary(launch, target)
                    extra_rng = insp.dropout_extra(launch, target, rep)[1]
                    c = roofline.triton_cost(launch, rep, hw, eff["triton"], extra_rng)
                    extra = per_w = None
                    if launch.params.get("QUANT"):
                        dense_rep = insp.binary(dense[launch.name], target)
                        extra, per_w = _decode_cost(launch, rep, dense_rep, M, N, K, hw, c)
                    if "dequant" in launch.name:  # a streaming pass: 4.5 bits in, e bytes out per weight
                        c.bytes_hbm = c.bytes_compulsory = N * K * (QUANT_BYTES_PER_WEIGHT + e) + \
                            N * K * absmax_bytes_per_weight(blocksize, nested)
                        c.t_mem = c.bytes_hbm / hw.hbm_bytes_per_s
                        c.t = c.t_mem + hw.launch_overhead_s
                        c.model = "dequant stream"
                    note_binary(launch, rep, extra, per_w)
                    ops[scen].append(c)
            per_path[path] = ops
        per_path["peft"] = {s: peft_qlora_pattern(M, N, K, r, p, e, blocksize, nested, hw, eff["cublas"])
                            for s, eff in roofline.EFFICIENCIES.items()}
        for scen, eff in roofline.EFFICIENCIES.items():
            base = sum(c.t for c in roofline.base_pattern(M, N, K, e, hw, eff["cublas"]))
            peft = sum(c.t for c in per_path["peft"][scen])
            for path, ops in per_path.items():
                t = sum(c.t for c in ops[scen])
                rows.append(dict(projection=proj, M=M, N=N, K=K, r=r, p=p, quant_type=quant_type, blocksize=blocksize,
                                 nested=nested, path=path, efficiency=scen, time_us=t * 1e6, base_bf16_us=base * 1e6,
                                 ratio_vs_bf16_base=t / base, ratio_vs_peft_qlora=t / peft, launches=len(ops[scen]),
                                 modeled=True, ops=[c.as_dict() for c in ops[scen]]))
    return dict(modeled=True, gpu=hw.as_dict(), target=target, quant_type=quant_type, blocksize=blocksize,
                nested=nested, rows=rows, binaries=list(binaries.values()))


def compile_check(kinds=("lora", "dora"), dtypes=("bfloat16", "float16", "float32"), dropouts=(0.0, 0.1),
                  ranks=(16, 64), nested=(True, False), projection="q/o", M=8192, target="sm_90a", gpu="h200") -> list:
    """Compile every 4-bit binary the fused path (and the hybrid path's dequant kernel) launches in its
    default config, over kinds, dtypes, dropout, ranks and nested or not; one dict per distinct binary
    (registers, spills, MMA kind, main-loop SASS per decoded W element)."""
    from .capture import Problem, check_compilable
    from .report import Inspector, _config_text, _flags_text, parse_projection

    check_compilable()
    hw = GPUS[gpu]
    insp = Inspector(hw)
    _, K, N = parse_projection(projection)
    out = {}
    for kind, dtype, p, r, nest in ((a, b, c, d, e) for a in kinds for b in dtypes for c in dropouts for d in ranks
                                    for e in nested):
        prob = Problem(projection, M, K, N, r, p, dtype, kind)
        for path in ("fused", "hybrid"):
            for launch in capture_qlora(prob, path, "nf4", 64, nest, 2 * hw.sms):
                if launch.kind != "triton" or not (launch.params.get("QUANT") or "dequant" in launch.name):
                    continue
                rep = insp.binary(launch, target)
                tile = launch.params.get("BLOCK_N", 1) * launch.params.get("BLOCK_K", 1)
                key = rep.hash
                out.setdefault(key, dict(
                    kernel=launch.name, kind=kind, dtype=dtype, rank=r, flags=_flags_text(launch),
                    config=_config_text(launch), registers=rep.registers, spills=rep.spills,
                    spill_bytes=rep.spill_stores + rep.spill_loads, mma=rep.mma_kind, ctas_per_sm=rep.ctas_per_sm,
                    loop_per_w=(rep.main_loop_instructions * 32 * rep.num_warps / tile
                                if launch.params.get("QUANT") and rep.main_loop_instructions else None)))
    return list(out.values())


def compile_markdown(rows: list) -> str:
    lines = ["| kernel | kind | dtype | r | flags | config | registers | spills | MMA | CTAs/SM | "
             "main-loop SASS / decoded W element |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in rows:
        lines.append(f"| {b['kernel']} | {b['kind']} | {b['dtype']} | {b['rank']} | {b['flags']} | {b['config']} | "
                     f"{b['registers']} | {'yes (' + str(b['spill_bytes']) + ' B)' if b['spills'] else 'no'} | "
                     f"{b['mma']} | {b['ctas_per_sm']} | "
                     f"{'-' if b['loop_per_w'] is None else format(b['loop_per_w'], '.1f')} |")
    return "\n".join(lines)


def choose_path_rows(report: dict, efficiency: str = "realistic") -> dict:
    """(projection, p) -> the faster of fused / hybrid in ``report`` (modeled)."""
    best = {}
    for r in report["rows"]:
        if r["efficiency"] != efficiency or r["path"] == "peft":
            continue
        key = (r["projection"], r["p"])
        if key not in best or r["time_us"] < best[key][1]:
            best[key] = (r["path"], r["time_us"])
    return {k: v[0] for k, v in best.items()}


def markdown(report: dict) -> str:
    lines = ["| projection | p | path | efficiency | modeled µs | modeled × bf16 base | modeled × PEFT QLoRA |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['projection']} (K={r['K']}, N={r['N']}) | {r['p']} | {r['path']} | {r['efficiency']} | "
                     f"{r['time_us']:.0f} | {r['ratio_vs_bf16_base']:.2f} | {r['ratio_vs_peft_qlora']:.2f} |")
    lines += ["", "| binary | kernel | flags | config | registers | spills | MMA | main-loop SASS | "
              "decode extra SASS / W element | loop SASS / W element |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in report["binaries"]:
        fmt = (lambda v: f"{v:.1f}" if isinstance(v, float) else "-")
        lines.append(f"| {b['id']} | {b['kernel']} | {b['flags']} | {b['config']} | {b['registers']} | "
                     f"{'yes' if b['spills'] else 'no'} | {b['mma']} | {b['main_loop_instructions']} | "
                     f"{fmt(b['decode_extra_per_w'])} | {fmt(b['loop_per_w'])} |")
    return "\n".join(lines)


def section_markdown(report: dict) -> str:
    """The report's QLoRA section (``lora-kernels inspect --qlora``)."""
    return "\n".join([
        "## QLoRA: 4-bit base (modeled)", "",
        f"{report['quant_type'].upper()}, blocksize {report['blocksize']}, nested absmax {report['nested']}; "
        "fused = W decoded in the GEMM loops, hybrid = dequant kernel to a bf16 scratch + cuBLAS + Triton LoRA, "
        "peft = bnb dequantize_4bit + cuBLAS + unfused LoRA with F.dropout's masked copy. Ratios against the bf16 "
        "frozen base and against PEFT QLoRA. **Every time and ratio is modeled.**", "", markdown(report)])


def run_isolated(**opts) -> dict:
    """:func:`run` in a clean process when Triton is in interpreter mode here."""
    import json
    import os
    import subprocess
    import sys

    opts.pop("progress", None)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return run(**opts)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import json, sys; from lora_kernels.perf.qlora_model import run; "
            "print(json.dumps(run(**json.loads(sys.argv[1]))))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(opts)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the QLoRA inspection process failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="QLoRA compile-level report (modeled)")
    ap.add_argument("--projections", default=None, help="comma list (q/o,k/v,gate/up,down or INxOUT)")
    ap.add_argument("--tokens", default="8192", help="comma list of token counts M")
    ap.add_argument("--quant-type", default="nf4")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-nested", action="store_true")
    ap.add_argument("--json", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    rep = run_isolated(projections=a.projections.split(",") if a.projections else None, quant_type=a.quant_type,
                       tokens=[int(t) for t in a.tokens.split(",")], blocksize=a.blocksize, nested=not a.no_nested)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    print(markdown(rep))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


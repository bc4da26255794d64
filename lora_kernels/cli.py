"""The ``lora-kernels`` command: ``info``, ``check`` (validation) and ``bench`` (microbenchmarks)."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _cmd_info(args) -> int:
    import torch

    from . import __version__
    from ._triton_env import is_interpreter, triton_version
    from ._versions import tested_pair_line
    from .backends import ENV_VAR, requested_backend, resolve_backend

    print(f"lora_kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version() or 'not installed'}")
    print(tested_pair_line(torch.__version__, triton_version()))
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}; Triton interpreter: {'on' if is_interpreter() else 'off'}")
    try:
        requested = requested_backend(None)
    except ValueError as exc:
        print(f"backend: invalid ${ENV_VAR}: {exc}")
        return 2
    print(f"backend: {requested} (from ${ENV_VAR} if set, else the default 'auto')")
    # What that resolves to here, for a float32 layer on each device this machine has (the choice
    # also depends on dtype and rank: float64 and ranks > 256 use torch; see lora_kernels/backends.py).
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.empty(16, 64, device=device)
        try:
            impl = resolve_backend(requested, x, 64, 8)
        except (RuntimeError, ValueError, TypeError) as exc:
            impl = f"error: {exc}"
        print(f"  {requested!r} on {device} tensors (float32, rank 8) -> {impl}")
    return 0


def _use_interpreter_without_gpu(device: str | None) -> str:
    """The device to use; without CUDA, switch the Triton interpreter on. This must happen before the
    kernels are imported (DESIGN.md §5); they are imported lazily."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lora-kernels: --device cuda asked for, but torch sees no CUDA device")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def positive_seconds(text: str) -> float:
    """argparse type of bench's --budget: seconds > 0 (omitting the option means no budget)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds > 0 (leave --budget out for no budget)")
    return value


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _cmd_check(args) -> int:
    device = _use_interpreter_without_gpu(args.device)
    from .check import run_check

    try:
        ok = run_check(device=device, grid="quick" if args.quick else args.grid, paths=_csv(args.paths),
                       families=_csv(args.families), summary=args.summary, json_path=args.json,
                       budget=args.budget)
    except ValueError as exc:  # an unknown family, path or grid: before anything ran
        print(f"lora-kernels check: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _cmd_bench(args) -> int:
    if args.model:  # whole-model training steps side by side with PEFT (lora_kernels/benchmarks/model.py)
        from .benchmarks.model import run_from_bench_args

        return run_from_bench_args(args)
    device = _use_interpreter_without_gpu(args.device)
    from .benchmarks import layer, measure, providers as prov, report, rows as rows_mod, shapes as shp

    preset = args.preset or (("quick" if device == "cuda" else "cpu-quick") if args.quick
                             else ("full" if device == "cuda" else "cpu"))
    if device != "cuda" and preset in ("full", "quick") and not args.allow_large_on_cpu:
        print(f"lora-kernels bench: preset {preset!r} has Llama-3-8B shapes, far too large for a CPU (the Triton "
              "paths run in the interpreter); use --preset cpu or cpu-quick, or --allow-large-on-cpu", file=sys.stderr)
        return 2
    shapes = shp.PRESETS[preset][0]()
    axes = [args.projections, args.tokens, args.ranks, args.dropouts, args.dtypes, args.kinds]
    custom = any(a is not None for a in axes)
    try:
        if custom:  # a custom grid: the cross product, the preset filling gaps
            projections = (shp.parse_projections(args.projections) if args.projections
                           else {s.name: (s.k, s.n) for s in shapes})
            tokens = [int(t) for t in _csv(args.tokens)] if args.tokens else sorted({s.m for s in shapes})
            ranks = [int(r) for r in _csv(args.ranks)] if args.ranks else sorted({s.r for s in shapes})
            dropouts = ([float(p) for p in _csv(args.dropouts)] if args.dropouts
                        else sorted({s.dropout_p for s in shapes}))
            dtypes = _csv(args.dtypes) or list(dict.fromkeys(s.dtype for s in shapes))
            kinds = [k.lower() for k in _csv(args.kinds)] if args.kinds else ["lora"]
            for dt in dtypes:
                if dt not in ("float32", "float16", "bfloat16"):
                    raise ValueError(f"--dtypes: {dt!r} is not one of float32, float16, bfloat16")
            for k in kinds:
                if k not in ("lora", "dora"):
                    raise ValueError(f"--kinds: {k!r} is not one of lora, dora")
            shapes = shp.grid_shapes(projections, tokens, ranks, dropouts, dtypes, kinds)
        if args.quant:  # every shape once per weight format: dense ('none') and / or 4-bit
            quants = [q.lower() for q in _csv(args.quant)]
            for q in quants:
                if q not in ("none", "nf4", "fp4"):
                    raise ValueError(f"--quant: {q!r} is not one of none, nf4, fp4")
            shapes = shp.with_quant(shapes, quants)
        providers = _csv(args.providers) or list(prov.DEFAULT_GPU_PROVIDERS if device == "cuda"
                                                 else prov.DEFAULT_CPU_PROVIDERS)
        for p in providers:
            if p not in prov.PROVIDERS:
                raise ValueError(f"--providers: {p!r} is not one of {', '.join(prov.PROVIDERS)}")
        if args.providers:  # asked for: refused rather than silently measuring nothing for them
            idle = prov.not_applicable(providers, shapes)
            if idle:
                raise ValueError(idle)
        else:  # the defaults: those that apply to the grid (e.g. no 4-bit providers on a dense custom grid)
            providers = [p for p in providers if any(prov.applies(p, s) for s in shapes)]
        # On a CPU only forward + backward is timed by default (one stable figure per provider and shape)
        default_modes = list(rows_mod.MODES) if device == "cuda" else ["fwdbwd"]
        modes = [] if args.saved_bytes_only else (_csv(args.modes) or default_modes)
        for mode in modes:
            if mode not in rows_mod.MODES:
                raise ValueError(f"--modes: {mode!r} is not one of {', '.join(rows_mod.MODES)}")
    except ValueError as exc:
        print(f"lora-kernels bench: {exc}", file=sys.stderr)
        return 2

    if device == "cuda":
        quick = preset == "quick"
        timer = measure.make_timer("cuda", warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    else:
        timer = measure.make_timer("cpu", cpu_reps=args.reps)
        print(f"# {report.CPU_NOTE}")
        if not args.providers:
            print("# torch.compile is left out on CPU by default (Inductor takes ~20 s per shape there); "
                  "add it with --providers")
    print(f"# {'custom grid' if custom else 'preset ' + preset}: {len(shapes)} shapes x {len(providers)} providers "
          f"({', '.join(providers)}), "
          f"modes {', '.join(modes) or 'none (saved bytes only)'}")
    untimed = () if device == "cuda" or args.time_interpreter else prov.INTERPRETED_PROVIDERS
    rows, meta, files = layer.run_bench(shapes, providers, device, modes, out_dir=args.out, budget_s=args.budget,
                                     progress=not args.no_progress, plots=not args.no_plots,
                                     compile_backend=args.compile_backend or "inductor", timer=timer,
                                     meta_extra={"preset": "custom" if custom else preset, "argv": args.argv},
                                     untimed=untimed, model_bench=not args.no_model)
    print(f"# {report.hardware_line(meta)}")
    print(report.cpu_report(rows) if device != "cuda" else report.markdown_table(rows))
    if meta.get("model_saved"):
        print()
        print(report.model_saved_markdown(meta["model_saved"]))
    if args.details:
        print()
        print(report.markdown_details(rows))
    for row in rows:
        if row.mode in ("invalid", "skipped"):
            why = row.extra.get("reason") or f"max rel err {row.extra.get('rel_err', float('nan')):.2e} > " \
                                              f"{row.extra.get('tol')}"
            print(f"# {row.mode}: {row.provider} at {shp.Shape(**row.shape)}: {why}")
    if files:
        print("# wrote " + ", ".join(files))
    invalid = [r for r in rows if r.mode == "invalid"]
    return 1 if invalid else 0


def _cmd_finetune(args) -> int:
    from .finetune import run

    return run(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default (those without a help text too; a help text that already
    says its default is kept as written), and descriptions keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)".strip()
        if action.default is None:
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


def _cmd_bench_multi(args) -> int:
    if not args.rest or args.rest[0] not in ("-h", "--help"):
        _use_interpreter_without_gpu(None)  # before the kernels are imported
    from .multi.bench import main as multi_main

    return multi_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-kernels",
        description="Fused Triton kernels for LoRA: validation, benchmarks and information.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, and the backend that would be used",
                            formatter_class=HelpFormatter)
    p_info.set_defaults(func=_cmd_info)

    p_check = sub.add_parser(
        "check",
        help="validate every kernel family (LoRA/DoRA, several adapters, 4-bit, projection groups) against the "
             "float64 reference",
        description="Runs every kernel family against the float64 reference over a grid of shapes, ranks, dtypes "
                    "and dropout rates and prints one table per family (path, case, relative error, tolerance, "
                    "pass/fail) and a summary line per family; exits non-zero on any failure. Families: lora "
                    "(lora_linear / dora_linear: y and dx, dA, dB, dm, db on torch, fused, hybrid), multi "
                    "(multi_adapter_linear: mixed batches and several active adapters, y and gradients, on torch "
                    "and the multi-adapter kernels 'triton'), qlora (the 4-bit dequantisation kernel bit for bit "
                    "'dequant', and LoRA/DoRA on NF4/FP4 weights on torch, fused, hybrid against the reference on "
                    "the dequantised weight), groups (grouped_lora, 2 and 3 members, against the reference and "
                    "separate lora_linear calls). Without a GPU the Triton paths run in Triton's CPU interpreter "
                    "on a small grid.",
        formatter_class=HelpFormatter,
    )
    p_check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p_check.add_argument("--families", default=None,
                         help="comma-separated subset of lora,multi,qlora,groups (default: all four)")
    p_check.add_argument("--paths", default=None,
                         help="comma-separated subset of torch,fused,hybrid,triton,dequant; each family runs those "
                              "it has (default: every path each family has on this device)")
    p_check.add_argument("--grid", choices=["quick", "small", "gpu"], default=None,
                         help="cases to run (default: gpu on CUDA, small on CPU)")
    p_check.add_argument("--quick", action="store_true",
                         help="the quick grid (a few cases per family, seconds in the interpreter; default: off)")
    p_check.add_argument("--summary", action="store_true",
                         help="one row per path and case: the max relative error over y and the gradients "
                              "(default: one row per quantity)")
    p_check.add_argument("--json", default=None, metavar="PATH",
                         help="also write every figure to this JSON file (rewritten after each family)")
    p_check.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                         help="family i of n starts no case but its first after (i+1)/n of this: every family "
                              "runs at least its first case, even past the budget; the cases not run are listed by "
                              "name (not failures) (default: none, every case runs)")
    p_check.set_defaults(func=_cmd_check)

    p_bench = sub.add_parser(
        "bench",
        help="validate, then time LoRA/DoRA providers (ours, the frozen floor, unfused eager, PEFT, torch.compile)",
        description="Validates each provider once (y and gradients against an fp32 reference), then times forward, "
                    "backward and forward+backward. Prints a markdown table; writes bench.json (every raw figure, "
                    "hardware, versions, git commit, date), bench.md and PNG plots to --out. Presets: full (GPU "
                    "default: Llama-3-8B projections), quick (GPU --quick), cpu (CPU default: 1/32-scale shapes), "
                    "cpu-quick (CPU --quick); each includes a few QLoRA (NF4) shapes (--quant to choose). CPU "
                    "timings say nothing about GPU speed; saved-for-backward bytes "
                    "are exact on any device. On a CPU the Triton paths run in Triton's interpreter: they are "
                    "validated and their bytes measured, not timed; the eager providers are timed with enough "
                    "repetitions for a median and its p20-p80 spread.",
        formatter_class=HelpFormatter,
    )
    p_bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p_bench.add_argument("--model", default=None, metavar="NAME",
                         help="whole-model training steps instead of layers: tiny (CPU), 1b, llama3-8b-layers; "
                              "PEFT vs inject vs convert (python -m lora_kernels.benchmarks.model --help for details)")
    p_bench.add_argument("--quick", action="store_true", help="a small preset (quick on a GPU, cpu-quick on CPU)")
    p_bench.add_argument("--preset", choices=["full", "quick", "cpu", "cpu-quick"], default=None,
                         help="default: full on a GPU, cpu on a CPU (quick / cpu-quick with --quick)")
    p_bench.add_argument("--projections", default=None,
                         help="comma-separated IN x OUT (e.g. 4096x1024) or Llama-3-8B names: q/o, k/v, gate/up, down")
    p_bench.add_argument("--tokens", default=None, help="comma-separated token counts (M); default: the preset's")
    p_bench.add_argument("--ranks", default=None, help="comma-separated ranks; default: the preset's")
    p_bench.add_argument("--dropouts", default=None, help="comma-separated dropout rates; default: the preset's")
    p_bench.add_argument("--dtypes", default=None,
                         help="comma-separated subset of bfloat16,float16,float32; default: the preset's")
    p_bench.add_argument("--kinds", default=None, help="lora, dora or lora,dora (with a custom grid; default: lora)")
    p_bench.add_argument("--providers", default=None,
                         help="comma-separated subset of base,unfused,peft,compile,torch,fused,hybrid and, for 4-bit "
                              "shapes (--quant), bnb4-base,peft-qlora,qlora-torch,qlora-fused,qlora-hybrid "
                              "(default: every one but torch and qlora-torch on a GPU; on a CPU all but compile); "
                              "a provider runs only on the shapes it applies to; one that applies to none of the "
                              "grid's shapes is refused (e.g. a 4-bit provider without --quant on a custom grid)")
    p_bench.add_argument("--quant", default=None,
                         help="comma-separated weight formats to run every shape with: none (dense), nf4, fp4; "
                              "a 4-bit shape runs the 4-bit providers on one weight quantised by bitsandbytes (or "
                              "lora_kernels' quantiser without it) and the dense floor base on its dequantisation "
                              "(default: the preset's shapes, which include a few nf4 ones)")
    p_bench.add_argument("--modes", default=None, help="comma-separated subset of fwd,bwd,fwdbwd (default: all on a GPU, fwdbwd on a CPU)")
    p_bench.add_argument("--saved-bytes-only", action="store_true",
                         help="validate and measure bytes saved for backward, no timing (exact on CPU too)")
    p_bench.add_argument("--out", default="bench_out", help="output folder")
    p_bench.add_argument("--budget", type=positive_seconds, default=None,
                         help="seconds > 0: start no new shape (or provider; with --model: run) after this; "
                              "results so far are kept (default: none, everything runs)")
    p_bench.add_argument("--reps", type=int, default=None,
                         help="CPU only: timed repetitions per figure (default: at least 30 and at least 0.25 s)")
    p_bench.add_argument("--time-interpreter", action="store_true",
                         help="CPU only: time the Triton paths in the interpreter too (their times mean nothing "
                              "about GPU speed; for debugging)")
    p_bench.add_argument("--no-model", action="store_true",
                         help="leave out the whole-model saved-bytes figure (a small Llama built from a config)")
    p_bench.add_argument("--compile-backend", default=None,
                         help="torch.compile backend of the compile provider (default: inductor)")
    p_bench.add_argument("--details", action="store_true", help="also print every figure (as in bench.md)")
    p_bench.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_bench.add_argument("--allow-large-on-cpu", action="store_true",
                         help="run the full or quick (Llama-3-8B) preset on CPU anyway, e.g. with --saved-bytes-only")
    p_bench.set_defaults(func=_cmd_bench)

    from .perf.report import add_arguments as inspect_arguments, cli as inspect_cli

    p_inspect = sub.add_parser(
        "inspect",
        help="compile-level performance report: compile every launch for sm_90a, read the binaries, model the time",
        description="Records the launches of the real forward+backward (Triton kernels and aten ops) on meta tensors, "
                    "compiles each Triton launch for the given targets without a GPU, and reports per binary "
                    "registers, spills, shared memory, CTAs per SM, MMA kind, TMA use and SASS instructions per "
                    "element; then a roofline model of fused, hybrid and the eager pattern against the frozen base. "
                    "Writes report.json and report.md to --out. Every time and ratio is modeled, not measured.",
    )
    inspect_arguments(p_inspect)
    p_inspect.set_defaults(func=inspect_cli)

    p_multi = sub.add_parser(
        "bench-multi",
        help="several adapters on one base: mixed-adapter batches and several active adapters vs PEFT's loop",
        description="The multi-adapter benchmark (lora_kernels.multi.bench): 2-64 adapters, uniform or skewed rows, "
                    "decode- or prefill-sized batches; PEFT's per-adapter loop, merging one adapter at a time, the "
                    "torch path and the kernels, each validated against the float64 oracle before timing. Every "
                    "argument after bench-multi goes to it: lora-kernels bench-multi --help lists them.",
        add_help=False,
    )
    p_multi.add_argument("rest", nargs=argparse.REMAINDER)
    p_multi.set_defaults(func=_cmd_bench_multi)

    from .finetune import __doc__ as finetune_doc, build_parser as finetune_parser

    p_ft = sub.add_parser(
        "finetune",
        help="fine-tune a real pretrained model on real data (offline), report, save the adapter",
        description=finetune_doc, formatter_class=HelpFormatter,
    )
    finetune_parser(p_ft)
    p_ft.set_defaults(func=_cmd_finetune)

    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench-multi"]:  # its own parser reads every argument after the subcommand
        return _cmd_bench_multi(argparse.Namespace(rest=raw[1:]))
    args = parser.parse_args(argv)
    args.argv = raw
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

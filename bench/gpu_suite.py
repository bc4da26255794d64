"""The GPU suite: validate every kernel on CUDA, then benchmark, in under 8 minutes on one H200.

    python bench/gpu_suite.py                 # writes under $OUT (default ./bench_out)
    python bench/gpu_suite.py --smoke         # tiny shapes: checks the script itself, CPU is fine

Installs nothing and needs no network: torch and triton must be there (peft is used if present).
Steps, each bounded in time, each writing its log under $OUT:
  1. env.json          GPU, driver, torch / triton / peft versions, git commit, date
  2. pytest.log        the test suite on CUDA (kernel tests run natively, fixed configs)
  3. check.log         `lora-kernels check` on the GPU grid (autotuned configs)
  4. bench.json/.md    fused / hybrid vs frozen base vs unfused cuBLAS+addmm_ (vs PEFT) at
                       Llama-3-8B shapes, LoRA and DoRA (vs PEFT-DoRA), most important shapes
                       first, until the time budget ends
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(cmd, log_path, timeout, env=None):
    t = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[{time.time() - t:6.1f}s] {' '.join(cmd[1:4])}... -> {rc} ({log_path})", flush=True)
    return rc


def env_info() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), sharey=True)
    names = sorted({r.shape["name"] for r in rows})
    for ax, name in zip(axes, names):
        base = {r.shape["m"]: r.ms_median for r in rows
                if r.shape["name"] == name and r.provider == "base" and r.mode == "fwdbwd"
                and r.shape["r"] == 16 and r.shape["dropout_p"] == 0.1}
        for prov in ("unfused", "peft", "fused", "hybrid"):
            pts = sorted((r.shape["m"], r.ms_median / base[r.shape["m"]]) for r in rows
                         if r.shape["name"] == name and r.provider == prov and r.mode == "fwdbwd"
                         and r.shape["r"] == 16 and r.shape["dropout_p"] == 0.1 and r.shape["m"] in base)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("fwd+bwd time / frozen base (r=16, p=0.1)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench_out")))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no pytest: checks the script")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    info = env_info()
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info), flush=True)

    status = {}
    if not args.smoke and not args.skip_tests:
        status["pytest"] = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests"],
                                os.path.join(args.out, "pytest.log"), timeout=min(170, deadline - time.time() - 200),
                                env={"LORA_KERNELS_AUTOTUNE": "0"})
        status["check"] = _run([sys.executable, "-m", "lora_kernels.cli", "check"],
                               os.path.join(args.out, "check.log"), timeout=min(120, deadline - time.time() - 150))

    from bench.bench_lora import Shape, default_shapes, markdown_table, run_shape, write_results

    if args.smoke:
        shapes = [Shape("tiny", 64, 96, 80, 8, p, "float32", dora) for dora in (False, True) for p in (0.0, 0.1)]
        providers = ["base", "unfused", "peft", "torch", "fused", "hybrid"]
    else:
        # most informative first: 8192 tokens, r=16, p=0.1, every projection
        shapes = sorted(default_shapes(), key=lambda s: (s.m != 8192, s.r != 16, s.dora, s.dropout_p == 0.0))
        providers = ["base", "unfused", "peft", "fused", "hybrid"]
    rows, done = [], 0
    for shape in shapes:
        if time.time() > deadline - 20:
            print(f"time budget reached after {done}/{len(shapes)} shapes", flush=True)
            break
        t = time.time()
        rows += run_shape(shape, providers, device)
        done += 1
        print(f"[{time.time() - t:5.1f}s] {shape}", flush=True)
        write_results(rows, os.path.join(args.out, "bench.json"), {**info, "shapes_done": done})
    table = markdown_table(rows)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"{info['gpu'] or 'CPU'}, torch {info['torch']}, triton {info['triton']}, {info['date']}\n\n{table}\n")
    print(table, flush=True)
    plot(rows, os.path.join(args.out, "speedup.png"))
    status["bench_shapes"] = f"{done}/{len(shapes)}"
    status["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(status), flush=True)
    return 0 if all(v in (0, None) for k, v in status.items() if k in ("pytest", "check")) else 1


if __name__ == "__main__":
    sys.exit(main())

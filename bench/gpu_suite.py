"""The GPU suite: the CUDA tests, `lora-kernels check` and `lora-kernels bench --quick`, in under 8
minutes on one H200.

    OUT=/some/dir python bench/gpu_suite.py     # writes under $OUT (default ./bench_out)
    python bench/gpu_suite.py --smoke           # checks the script itself on any machine (CPU is fine):
                                                # no pytest, `check --quick`, `bench --quick` (cpu-quick)

Installs nothing and needs no network: torch and triton must be there (peft is used if present,
matplotlib and tqdm too). Steps, each bounded in time, each writing its log under $OUT:
  1. env.json                  GPU, driver, CPU, torch / triton / peft versions, git commit, date
  2. pytest.log                the kernel, DoRA, dropout, compile, determinism and autocast tests on CUDA (fixed configs)
  3. check.log, check.json     `lora-kernels check --summary` on the GPU grid (autotuned configs)
  4. bench.log, bench.json,    `lora-kernels bench --quick`: fused / hybrid vs the frozen base, the
     bench.md, *.png           unfused cuBLAS+addmm_ path, PEFT and torch.compile at Llama-3-8B
                               shapes, LoRA and DoRA, then QLoRA (NF4: qlora-fused / qlora-hybrid vs
                               bitsandbytes' 4-bit floor and PEFT QLoRA when bitsandbytes is there),
                               most informative shapes first, until the time budget ends (bench.json
                               is rewritten after every shape)
  5. model_1b/, model_bench.log  `lora-kernels bench --model 1b` (whole training steps, PEFT vs inject
                               vs convert) in the time left, at most ~110 s
  6. status.json               exit codes and timings of the steps
Also on a GPU (separately, a few minutes each): bench/multi_gpu_check.sh (multi-adapter kernels),
`lora-kernels inspect` needs no GPU.
"""
from __future__ import annotations

import argparse
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
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                     **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[{time.time() - t:6.1f}s] {' '.join(cmd[1:5])}... -> {rc} ({log_path})", flush=True)
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench_out")))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite")
    parser.add_argument("--smoke", action="store_true",
                        help="no pytest, quick check, CPU-sized bench: checks the script")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-model", action="store_true", help="leave out the whole-model bench (step 6)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # for the subprocesses too
    from lora_kernels.benchmarks.env import env_info
    from lora_kernels.benchmarks.report import load_results, report_markdown

    info = env_info()
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info), flush=True)

    py = sys.executable
    status = {}
    if not args.smoke and not args.skip_tests:
        # The tests that run kernels natively on CUDA (the rest exercise CPU-only paths, already covered
        # by CI; the fine-tune tests need two PyPI packages the GPU machine does not have).
        gpu_tests = [f"tests/test_{name}.py" for name in (
            "dropout", "kernels", "dora", "backends", "configs", "compile", "determinism", "autocast",
            "tiny_llama", "properties", "multi_adapter", "quant_kernels", "qlora", "qlora_fused", "grouped",
            "groups")]
        status["pytest"] = _run([py, "-m", "pytest", "-q", "--maxfail=20", "--continue-on-collection-errors",
                                 "-p", "no:cacheprovider", *gpu_tests],
                                os.path.join(args.out, "pytest.log"), timeout=min(170, deadline - time.time() - 200),
                                env={"LORA_KERNELS_AUTOTUNE": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    # every kernel family (lora, multi, qlora, groups); --budget shares the time among them and lists
    # the cases left out (each family still runs its first case: the timeout leaves room for that),
    # so a slow autotune cannot eat the bench's time
    check = [py, "-m", "lora_kernels.cli", "check", "--summary", "--budget", "80", "--json",
             os.path.join(args.out, "check.json")]
    status["check"] = _run(check + (["--quick"] if args.smoke else []), os.path.join(args.out, "check.log"),
                           timeout=min(140, deadline - time.time() - 150))

    # bench --quick until the budget ends: it starts no shape after --budget and rewrites bench.json
    # after every shape, so a kill at the timeout still leaves every finished shape.
    left = deadline - time.time()
    model_share = 0 if args.smoke or args.skip_model else min(110.0, max(left - 200, 0))  # step 6 below
    bench = [py, "-m", "lora_kernels.cli", "bench", "--quick", "--out", args.out, "--no-progress",
             "--budget", f"{max(left - model_share - 100, 10):.0f}"]  # a compile or autotune in flight may need ~90 s
    if args.smoke:
        bench += ["--modes", "fwdbwd", "--reps", "1"]
    status["bench"] = _run(bench, os.path.join(args.out, "bench.log"), timeout=max(left - model_share - 10, 30))
    json_path, md_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.md")
    if os.path.exists(json_path):
        rows, meta = load_results(json_path)
        if status["bench"] == "timeout" or not os.path.exists(md_path):
            with open(md_path, "w") as f:
                f.write(report_markdown(rows, meta))
        status["bench_shapes"] = f"{meta.get('shapes_done')}/{meta.get('shapes_total')}"
        status["bench_rows"] = len(rows)
    with open(os.path.join(args.out, "bench.log")) as f:
        print(f.read()[-6000:], flush=True)
    left = deadline - time.time()
    if model_share and left > 60:  # 6. whole-model training steps at 1B scale, PEFT vs inject vs convert
        status["model_bench"] = _run([py, "-m", "lora_kernels.cli", "bench", "--model", "1b", "--budget",
                                      f"{max(left - 40, 20):.0f}", "--out", os.path.join(args.out, "model_1b")],
                                     os.path.join(args.out, "model_bench.log"), timeout=max(left - 5, 30))
    status["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "status.json"), "w") as f:
        json.dump(status, f, indent=1)
    print(json.dumps(status), flush=True)
    ok = all(status.get(k) in (0, None) for k in ("pytest", "check")) and status["bench"] in (0, "timeout")
    return 0 if ok and os.path.exists(json_path) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Device check for the multi-adapter kernels (issue 18), sized for a few minutes on one GPU:
# the multi-adapter tests on CUDA (kernel cases run natively there), then the multi-adapter benchmark
# (every provider validated against the float64 oracle before timing). Writes into ${OUT:-.}.
set -euo pipefail
out="${OUT:-.}"
timeout 300 python -m pytest tests/test_multi_adapter.py -q -x -p no:cacheprovider | tee "$out/multi_tests.txt"
timeout 240 python -m lora_kernels.multi.bench --preset gpu --adapters 2,16,64 --reps 20 \
    --json "$out/multi_gpu.json" --markdown "$out/multi_gpu.md"

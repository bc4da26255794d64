"""LoRA linear microbenchmarks: a thin wrapper over :mod:`lora_kernels.benchmarks`, the harness that
``lora-kernels bench`` runs (it lives in the package so the console script works after
``pip install -e .``).

    python bench/bench_lora.py [lora-kernels bench options]     # same as `lora-kernels bench ...`

CPU timings say nothing about GPU speed; saved-for-backward bytes are exact on any device.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the Triton interpreter must be on before the kernels are imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_kernels.benchmarks.env import env_info  # noqa: E402,F401  (re-exported for scripts)
from lora_kernels.benchmarks.layer import run_bench, run_shape  # noqa: E402,F401
from lora_kernels.benchmarks.measure import make_timer, saved_bytes  # noqa: E402,F401
from lora_kernels.benchmarks.plots import write_plots  # noqa: E402,F401
from lora_kernels.benchmarks.providers import (  # noqa: E402,F401
    BASELINES, OUR_PROVIDERS, PROVIDERS, make_problem, provider_fn)
from lora_kernels.benchmarks.report import (  # noqa: E402,F401
    load_results, markdown_details, markdown_table, report_markdown, write_results)
from lora_kernels.benchmarks.rows import MODES, Row, add_ratios  # noqa: E402,F401
from lora_kernels.benchmarks.shapes import LLAMA3_8B_PROJECTIONS, PRESETS, Shape, default_shapes, quick_shapes  # noqa: E402,F401
from lora_kernels.benchmarks.validation import validate  # noqa: E402,F401

if __name__ == "__main__":
    from lora_kernels.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))

"""LoRA linear microbenchmarks: a thin wrapper over :mod:`lora_kernels.benchmark`, the harness that
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

from lora_kernels.benchmark import (  # noqa: E402,F401  (re-exported for scripts and older imports)
    BASELINES,
    LLAMA3_8B_PROJECTIONS,
    MODES,
    OUR_PROVIDERS,
    PRESETS,
    PROVIDERS,
    Row,
    Shape,
    add_ratios,
    default_shapes,
    env_info,
    load_results,
    make_problem,
    make_timer,
    markdown_details,
    markdown_table,
    provider_fn,
    quick_shapes,
    report_markdown,
    run_bench,
    run_shape,
    saved_bytes,
    validate,
    write_plots,
    write_results,
)

if __name__ == "__main__":
    from lora_kernels.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))

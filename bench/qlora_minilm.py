"""MiniLM (BBC News) fine-tune on a 4-bit base beside the dense-base run, through `lora-kernels finetune`'s
own code: the same options and seed twice, once plain and once with ``--quantize`` (every encoder
Linear in NF4, blocksize 64, nested statistics; the pooler and classifier head stay dense and train).

    PYTHONPATH=. python bench/qlora_minilm.py [finetune options]   e.g. --steps 60 --max-length 64 --limit 1000

Prints both runs' accuracies and losses as JSON.
"""
from __future__ import annotations

import json
import os
import sys

from lora_kernels import finetune


def main(argv):
    results = {}
    for kind in ("dense", "nf4"):
        extra = ["--quantize", "nf4"] if kind == "nf4" else []
        args = finetune.build_parser().parse_args(argv + extra + ["--out", f"qlora_minilm_out/{kind}", "--no-progress"])
        args.device = args.device or "cpu"
        os.makedirs(args.out, exist_ok=True)
        r = finetune.run_classification(args)
        results[kind] = {k: r[k] for k in ("accuracy_before", "accuracy_after", "first_loss", "final_loss",
                                           "seconds_per_step", "eval_size", "train_size", "quantized_modules")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])

"""MiniLM (BBC News) fine-tune on a 4-bit NF4 base beside the bf16/fp32 run, with lora-kernels finetune's
own training code (lora_kernels.finetune), until `lora-kernels finetune --quantize nf4` exists.

    PYTHONPATH=. python bench/qlora_minilm.py [finetune options, e.g. --steps 80]

Runs the classification fine-tune twice with the same seed and options: once as is (dense frozen
base), once with every encoder Linear quantised to NF4 (blocksize 64, nested statistics) before the
adapters are injected (the pooler and classifier head stay dense: they train). Prints both accuracies.
The 4-bit run's "reload" and "merge" figures are not meaningful here (the reload uses a dense base;
merging re-quantises) and are not printed.
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import finetune
from lora_kernels.qlora_layers import quantize_modules


def main(argv):
    results = {}
    original = lk.inject
    for kind in ("dense", "nf4"):
        args = finetune.build_parser().parse_args(argv + ["--out", f"qlora_minilm_out/{kind}", "--no-progress"])
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

        def inject(model, config, *a, _kind=kind, **k):
            if _kind == "nf4":
                names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{n}."]
                quantize_modules(model, names, "nf4")
            return original(model, config, *a, **k)

        lk.inject = inject
        try:
            import os
            os.makedirs(args.out, exist_ok=True)
            r = finetune.run_classification(args)
        finally:
            lk.inject = original
        results[kind] = {k: r[k] for k in ("accuracy_before", "accuracy_after", "first_loss", "final_loss",
                                           "seconds_per_step", "eval_size", "train_size")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    main(sys.argv[1:])

"""lora-kernels finetune --quantize nf4 (QLoRA on MiniLM), briefly: a tiny subset, a few steps."""
import json

import pytest

from lora_kernels.cli import main


def test_finetune_on_a_4bit_base(tmp_path):
    out = tmp_path / "q"
    assert main(["finetune", "--limit", "40", "--steps", "3", "--batch-size", "4", "--max-length", "32",
                 "--quantize", "nf4", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["quantize"] == "nf4" and len(r["losses"]) == 3
    assert r["quantized_modules"] == 36  # 6 layers x (q, k, v, attention out, intermediate, out)
    assert r["reload_identical_predictions"]  # same deterministic 4-bit bytes in the fresh model
    with pytest.raises(SystemExit, match="--quantize is supported with --task classification"):
        main(["finetune", "--task", "causal-lm", "--quantize", "nf4", "--out", str(tmp_path / "c")])

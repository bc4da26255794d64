"""Family ``lora``: single-adapter LoRA and DoRA (``lora_linear`` / ``dora_linear``), y and every gradient
(dx, dA, dB, dm, db) on the torch, fused and hybrid paths against the float64 reference
(the harness of :mod:`lora_kernels.testing`)."""
from __future__ import annotations

import torch

from ..testing import LoraCase, make_inputs, run_path, run_reference
from .base import Family, errors

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# Small grid for the CPU interpreter: every masking edge, rank, dtype, p, layout.
SMALL_GRID = [
    LoraCase(70, 90, 130, 1, f32, 0.0),
    LoraCase(70, 90, 130, 8, f16, 0.1, bias=False),
    LoraCase(70, 90, 130, 12, bf16, 0.5),
    LoraCase(33, 65, 70, 16, f32, 0.1, batch=3),
    LoraCase(150, 65, 70, 64, bf16, 0.1),
    LoraCase(50, 97, 65, 64, f16, 0.5, noncontiguous=True),
    LoraCase(70, 90, 130, 8, f32, 0.0, dora=True),
    LoraCase(33, 65, 70, 16, bf16, 0.1, batch=3, dora=True),
    LoraCase(50, 97, 65, 12, f16, 0.5, bias=False, noncontiguous=True, dora=True),
]

# Larger shapes for a GPU: several tiles and splits in every dimension, and a Llama-sized one.
GPU_GRID = SMALL_GRID + [
    LoraCase(1000, 1100, 1300, 16, bf16, 0.1),
    LoraCase(777, 2048, 1536, 8, f16, 0.0, batch=2),
    LoraCase(513, 1024, 4096, 64, bf16, 0.1, noncontiguous=True),
    LoraCase(2048, 4096, 4096, 16, bf16, 0.1),
    LoraCase(1024, 1024, 4096, 256, bf16, 0.5),
    LoraCase(333, 768, 1024, 12, f32, 0.1),
    LoraCase(1000, 1100, 1300, 16, bf16, 0.1, dora=True),
    LoraCase(2048, 4096, 4096, 16, bf16, 0.0, dora=True),
    LoraCase(777, 2048, 1536, 64, f16, 0.1, noncontiguous=True, dora=True),
]

# A few seconds in the interpreter: LoRA and DoRA, with and without dropout, each dtype once.
QUICK_GRID = [
    LoraCase(70, 90, 130, 8, f32, 0.1),
    LoraCase(33, 65, 70, 16, bf16, 0.1, batch=3),
    LoraCase(50, 97, 65, 12, f16, 0.0, bias=False, noncontiguous=True),
    LoraCase(33, 65, 70, 8, f32, 0.1, dora=True),
]

LEGEND = (
    "case: M tokens (BxM: x is 3-D, a batch of B sequences of M), N outputs, K inputs, r rank, dtype,",
    "      p dropout; +bias: with a bias; nc: x non-contiguous (a transposed view, stride along K != 1);",
    "      DoRA: magnitude-direction adapter. qty: y or the gradient dx, dA, dB, dm (DoRA), db (bias)",
)


def prepare(case: LoraCase, device: str):
    inputs = make_inputs(case, device)
    return inputs, run_reference(case, inputs)


def run(path: str, case: LoraCase, prepared, device: str) -> dict[str, float]:
    inputs, ref = prepared
    return errors(run_path(path, case, inputs), ref)


FAMILY = Family(
    name="lora",
    title="single-adapter LoRA / DoRA (lora_linear, dora_linear): y and every gradient",
    legend=LEGEND,
    grids={"quick": QUICK_GRID, "small": SMALL_GRID, "gpu": GPU_GRID},
    kernel_paths=("fused", "hybrid"),
    prepare=prepare,
    run=run,
)

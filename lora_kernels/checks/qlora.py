"""Family ``qlora``: 4-bit frozen weights (:class:`lora_kernels.quant.QuantizedWeight`, NF4 / FP4,
nested absmax or not).

- path ``dequant``: the Triton dequantisation kernel (:func:`lora_kernels.kernels.dequant.dequant_4bit`)
  into a NaN-filled buffer against :func:`lora_kernels.quant.dequantize`, bit for bit: the error is the
  fraction of elements whose bits differ (tolerance 0);
- paths ``torch`` / ``fused`` / ``hybrid``: ``lora_linear`` / ``dora_linear`` with the 4-bit weight
  (fused: decoded inside the GEMM loops; hybrid: dequantised by the kernel, then cuBLAS) against the
  float64 reference on the dequantised weight deq(Q) in the compute dtype, y and every gradient
  (the harness of :mod:`lora_kernels.testing`, as tests/test_qlora_fused.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import qlora
from ..quant import dequantize, quantize
from ..testing import LoraCase, make_inputs, run_path, run_reference
from .base import Family, TOLERANCES, errors

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class QuantCase:
    quant_type: str  # "nf4" or "fp4"
    blocksize: int
    nested: bool  # double-quantised absmax (bitsandbytes' compress_statistics)
    lora: LoraCase

    @property
    def dtype(self) -> torch.dtype:
        return self.lora.dtype

    def __str__(self) -> str:
        return f"{self.quant_type}/{self.blocksize}{' nested' if self.nested else ''} {self.lora}"


def Q(quant_type, blocksize, nested, *lora, **kw) -> QuantCase:
    return QuantCase(quant_type, blocksize, nested, LoraCase(*lora, **kw))


# K not a multiple of the blocksize (blocks straddle rows), odd K (rows start mid-byte), odd N and r.
SMALL_GRID = [
    Q("nf4", 64, False, 24, 40, 72, 8, f32, 0.0),
    Q("nf4", 64, True, 17, 33, 100, 5, bf16, 0.2, bias=False),
    Q("fp4", 128, True, 20, 37, 136, 3, f16, 0.1),
    Q("fp4", 64, False, 13, 35, 75, 6, bf16, 0.1, batch=2),
    Q("nf4", 64, True, 16, 40, 72, 8, bf16, 0.0, dora=True),
    Q("fp4", 128, False, 14, 33, 129, 4, f32, 0.2, bias=False, dora=True),
]

QUICK_GRID = [SMALL_GRID[2], SMALL_GRID[4]]

# On a GPU: M on both sides of the fused/hybrid rule (64 tokens), Llama-3-8B q/o and down projections.
# Every case of a new shape compiles and autotunes the fused GEMMs afresh (their 4-bit variants), so the
# GPU grid keeps three small cases (each dtype once) and the two M=64/1024 cases share one shape.
GPU_GRID = [SMALL_GRID[1], SMALL_GRID[2], SMALL_GRID[5]] + [
    Q("nf4", 64, True, 64, 4096, 4096, 16, bf16, 0.1),
    Q("nf4", 64, True, 1024, 4096, 4096, 16, bf16, 0.1),
    Q("fp4", 64, False, 512, 4096, 14336, 16, f16, 0.0),
    Q("nf4", 64, True, 256, 4096, 4096, 16, bf16, 0.0, dora=True),
]

LEGEND = (
    "case: nf4|fp4 / blocksize, nested: double-quantised absmax; then as family lora (M, N, K, r, dtype, p,",
    "      +bias, DoRA). dequant: qty bits = fraction of W's elements whose bits differ from",
    "      lora_kernels.quant.dequantize (tolerance 0); other paths: y and every gradient against the",
    "      float64 reference on the dequantised weight",
)


def prepare(case: QuantCase, device: str):
    x, weight, a, b, bias, g, mag = make_inputs(case.lora, device)
    qw = quantize(weight.float(), case.quant_type, case.blocksize, compress_statistics=case.nested)
    dense = dequantize(qw, case.dtype)
    dense_inputs = (x, dense, a, b, bias, g, mag)
    return (x, qw, a, b, bias, g, mag), run_reference(case.lora, dense_inputs), dense


def run(path: str, case: QuantCase, prepared, device: str) -> dict[str, float]:
    q_inputs, ref, dense = prepared
    qlora.release_scratch()  # torch / hybrid dequantise into a fresh (NaN-filled) scratch, not last case's W
    if path == "dequant":
        from ..kernels.dequant import dequant_4bit

        out = dequant_4bit(q_inputs[1], torch.full(dense.shape, float("nan"), dtype=dense.dtype, device=device))
        bits = {torch.float32: torch.int32}.get(dense.dtype, torch.int16)
        return {"bits": (out.view(bits) != dense.view(bits)).double().mean().item()}
    return errors(run_path(path, case.lora, q_inputs), ref)


FAMILY = Family(
    name="qlora",
    title="4-bit weights: the dequant kernel bit for bit, LoRA / DoRA on a QuantizedWeight",
    legend=LEGEND,
    grids={"quick": QUICK_GRID, "small": SMALL_GRID, "gpu": GPU_GRID},
    kernel_paths=("dequant", "fused", "hybrid"),
    prepare=prepare,
    run=run,
    tolerance=lambda path, case: 0.0 if path == "dequant" else TOLERANCES[case.dtype],
)

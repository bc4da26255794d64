"""4-bit (NF4 / FP4, bitsandbytes layout) → fp16 / bf16 / fp32 dequantisation: ``_dequant_4bit_kernel``
and its launcher ``dequant_4bit``.

Each program writes BLOCK consecutive elements of the flattened N×K output. Element i reads byte
i // 2 (high nibble for even i, low for odd), its code value, and the absmax of block i // blocksize;
the flattening is bitsandbytes' own, so a quantisation block that straddles two rows (K not a
multiple of the blocksize) needs no special case. Nested absmax: code2[q] · absmax2[b // bs2] + offset.

Bitwise equal to :func:`lora_kernels.quant.dequantize` (so to bitsandbytes' dequantize_4bit): the
products are fp32, the nested multiply and add are kept apart (no FMA contraction:
``enable_fp_fusion=False``), and the fp32 → bf16 rounding is done with integer operations
(round to nearest even) because the interpreter's bf16 cast truncates (DESIGN.md §5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK = 1024


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    numel, blocksize, blocksize2,
    NESTED: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """packed: ceil(numel/2) uint8; absmax: ceil(numel/blocksize) fp32 (uint8 when NESTED);
    code: 16 fp32; absmax2: ceil(blocks/blocksize2) fp32, code2: 256 fp32, offset: 1 fp32 (NESTED);
    out: numel elements (OUT_KIND 0 fp32, 1 fp16, 2 bf16), contiguous."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = offs // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // blocksize2, mask=mask, other=0.0)
        offset = tl.load(offset_ptr)
        absmax = tl.load(code2_ptr + q, mask=mask, other=0.0) * scale2
        absmax = absmax + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    w = value * absmax
    if OUT_KIND == 2:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 1:
        out = w.to(tl.float16)
    else:
        out = w
    tl.store(out_ptr + offs, out, mask=mask)


def dequant_4bit(qw, out: torch.Tensor) -> torch.Tensor:
    """Write ``qw`` (a :class:`lora_kernels.quant.QuantizedWeight`) dequantised into ``out``, a
    contiguous tensor with ``qw.numel()`` elements of fp32/fp16/bf16 on qw's device; returns out."""
    if out.dtype not in _OUT_KIND:
        raise TypeError(f"dequant_4bit writes {tuple(_OUT_KIND)}, got out of {out.dtype}")
    if not out.is_contiguous() or out.numel() != qw.numel():
        raise ValueError(f"out must be contiguous with {qw.numel()} elements, got shape {tuple(out.shape)}")
    numel = qw.numel()
    nested = qw.nested is not None
    absmax2 = qw.nested.absmax if nested else qw.absmax
    code2 = qw.nested.code if nested else qw.code
    offset = qw.nested.offset.reshape(1) if nested else qw.code
    grid = (triton.cdiv(numel, BLOCK),)
    _dequant_4bit_kernel[grid](
        qw.packed, qw.absmax, qw.code, absmax2, code2, offset, out,
        numel, qw.blocksize, qw.nested.blocksize if nested else 1,
        NESTED=nested, OUT_KIND=_OUT_KIND[out.dtype], BLOCK=BLOCK, enable_fp_fusion=False,
    )
    return out

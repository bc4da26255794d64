"""4-bit (NF4 / FP4, bitsandbytes layout) → fp16 / bf16 / fp32 decoding: ``load_w4`` (a jit helper that
decodes any tile of flat indices in registers: the dequant kernel below and, inside their K / N loops,
the fused GEMM kernels of :mod:`.linear_fwd`, :mod:`.linear_bwd` and DoRA's norm use it), the
dequantisation kernel ``_dequant_4bit_kernel`` and its launcher ``dequant_4bit`` (the hybrid path's
scratch buffer).

Each program writes BLOCK consecutive elements of the flattened N×K output. Element i reads byte
i // 2 (high nibble for even i, low for odd), its code value, and the absmax of block i // blocksize;
the flattening is bitsandbytes' own, so a quantisation block that straddles two rows (K not a
multiple of the blocksize) needs no special case. Nested absmax: code2[q] · absmax2[b // bs2] + offset.

Bitwise equal to :func:`lora_kernels.quant.dequantize` (so to bitsandbytes' dequantize_4bit): the
products are fp32, the nested multiply and add are kept apart (no FMA contraction: the
multiply is a PTX ``mul.rn``, which ptxas never contracts, and the dequant kernel is compiled with
``enable_fp_fusion=False`` besides), and the fp32 → bf16 rounding is done with integer operations
(round to nearest even) because the interpreter's bf16 cast truncates (DESIGN.md §5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_env import is_interpreter

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK = 1024


@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """a·b in fp32, never contracted into an FMA with a following add: PTX ``mul.rn`` (an explicit
    rounding mode) is exempt from contraction. The interpreter (numpy) never contracts."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def round_to(w, OUT_KIND: tl.constexpr):
    """fp32 ``w`` rounded to nearest even into OUT_KIND (0 fp32, 1 fp16, 2 bf16); bf16 by integer
    operations because the interpreter's bf16 cast truncates (DESIGN.md §5)."""
    if OUT_KIND == 2:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 1:
        return w.to(tl.float16)
    else:
        return w


@triton.jit
def _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                  QBLOCK2: tl.constexpr, NESTED: tl.constexpr, INTERPRET: tl.constexpr):
    """The fp32 absmax of quantisation block(s) ``block`` (nested: code2[q]·absmax2[block // QBLOCK2] +
    offset, multiply and add rounded apart as bitsandbytes does)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        offset = tl.load(offset_ptr)
        return _mul_rn(tl.load(code2_ptr + q, mask=mask, other=0.0), scale2, INTERPRET) + offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _narrow(t, IDX64: tl.constexpr):
    """A non-negative int64 index as unsigned 32 bits (64 when IDX64): the divisions by the
    power-of-two block sizes become shifts."""
    if IDX64:
        return t.to(tl.uint64)
    else:
        return t.to(tl.uint32)


@triton.jit
def _code_values(packed_ptr, code_ptr, idx, mask):
    """code[nibble i] (fp32) at flat indices ``idx``: byte i // 2, high nibble for even i."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx % 2) == 0, byte >> 4, byte & 15)
    return tl.load(code_ptr + nibble, mask=mask, other=0.0)


@triton.jit
def _absmax_at(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, start, k0, numel,
               QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr, IDX64: tl.constexpr,
               TILE_K: tl.constexpr, INTERPRET: tl.constexpr):
    """The fp32 absmax of flat indices ``idx`` (a tile whose row r starts at ``start[r]`` (int64) + k0 and
    spans TILE_K columns). When QBLOCK >= TILE_K a row of the tile spans at most two blocks: their
    absmax values are computed once per row and each element selects one; otherwise every element
    loads (and, nested, decodes) its own."""
    block = idx // QBLOCK
    if QBLOCK >= TILE_K:
        first64 = (start + k0) // QBLOCK
        am0 = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first64, first64 * QBLOCK < numel,
                            QBLOCK2, NESTED, INTERPRET)
        am1 = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first64 + 1,
                            (first64 + 1) * QBLOCK < numel, QBLOCK2, NESTED, INTERPRET)
        return tl.where(block == _narrow(first64, IDX64), am0, am1)
    else:
        return _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, QBLOCK2, NESTED, INTERPRET)


@triton.jit
def load_w4(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
            QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr, OUT_KIND: tl.constexpr,
            IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """The W tile rows ``offs_n`` (int64, BLOCK_N) × columns k0 + [0, BLOCK_K) of a 4-bit weight, decoded
    in registers and rounded to OUT_KIND (0 fp32, 1 fp16, 2 bf16): bitwise equal to the same tile of
    :func:`lora_kernels.quant.dequantize`. Out-of-range rows / columns give 0.

    Element (n, k) is flat index i = n·K + k (bitsandbytes' flattening, so a quantisation block that
    straddles two rows needs nothing special): code[nibble of byte i // 2] · absmax[i // QBLOCK].
    The GEMM kernels use this inside their K / N loops (the forward transposes the tile); W is never
    written to memory. (The tile is decoded in this (N, K) orientation, K fastest, in every kernel:
    compiled for sm_90a, the forward's main loop was 685 SASS instructions this way against 1027 when
    decoding the (K, N) tile directly; decoding byte pairs and joining the two nibbles cost more than
    it saved, 972.)"""
    numel = N.to(tl.int64) * K
    start = offs_n * K
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (k < K)[None, :]
    idx = _narrow(start, IDX64)[:, None] + _narrow(k, IDX64)[None, :]
    value = _code_values(packed_ptr, code_ptr, idx, mask)
    absmax = _absmax_at(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, start[:, None], k0, numel,
                        QBLOCK, QBLOCK2, NESTED, IDX64, BLOCK_K, INTERPRET)
    if OUT_KIND == 0:  # fp32 goes into the caller's arithmetic as is: never contracted into an FMA there
        return _mul_rn(value, absmax, INTERPRET)
    else:
        return round_to(value * absmax, OUT_KIND)


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    numel,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr, OUT_KIND: tl.constexpr,
    IDX64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    """packed: ceil(numel/2) uint8; absmax: ceil(numel/QBLOCK) fp32 (uint8 when NESTED);
    code: 16 fp32; absmax2: ceil(blocks/QBLOCK2) fp32, code2: 256 fp32, offset: 1 fp32 (NESTED);
    out: numel elements (OUT_KIND 0 fp32, 1 fp16, 2 bf16), contiguous."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    idx = _narrow(offs, IDX64)
    value = _code_values(packed_ptr, code_ptr, idx, mask)
    absmax = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx // QBLOCK, mask, QBLOCK2, NESTED,
                           INTERPRET)
    out = round_to(value * absmax, OUT_KIND)
    tl.store(out_ptr + offs, out, mask=mask)


def quant_operands(qw, dtype: torch.dtype) -> tuple:
    """The five extra pointer operands of a 4-bit weight (absmax, code, absmax2, code2, offset) and the
    constexpr flags of :func:`load_w4` for decoding into ``dtype``."""
    if dtype not in _OUT_KIND:
        raise TypeError(f"a 4-bit weight decodes to {tuple(_OUT_KIND)}, got {dtype}")
    nested = qw.nested is not None
    ptrs = (qw.absmax, qw.code, qw.nested.absmax if nested else qw.absmax, qw.nested.code if nested else qw.code,
            qw.nested.offset.reshape(1) if nested else qw.code)
    flags = dict(QBLOCK=qw.blocksize, QBLOCK2=qw.nested.blocksize if nested else 1, NESTED=nested,
                 OUT_KIND=_OUT_KIND[dtype], IDX64=qw.numel() + BLOCK >= 2**31)
    return ptrs, flags


def weight_operands(weight, dtype: torch.dtype, fallback: torch.Tensor) -> tuple:
    """What a GEMM kernel with a QUANT flag takes for ``weight`` (a dense N×K tensor or a
    :class:`lora_kernels.quant.QuantizedWeight`): (w tensor, stride_n, stride_k, five quant pointers,
    flags). A dense weight gets ``fallback`` as the unused quant pointers and QUANT=False."""
    from ..quant.format import QuantizedWeight

    if isinstance(weight, QuantizedWeight):
        ptrs, flags = quant_operands(weight, dtype)
        flags = dict(QUANT=True, W_KIND=flags.pop("OUT_KIND"), INTERPRET=is_interpreter(), **flags)
        return weight.packed, weight.shape[1], 1, ptrs, flags
    flags = dict(QUANT=False, W_KIND=0, QBLOCK=1, QBLOCK2=1, NESTED=False, IDX64=False, INTERPRET=is_interpreter())
    return weight, weight.stride(0), weight.stride(1), (fallback,) * 5, flags


def dequant_4bit(qw, out: torch.Tensor) -> torch.Tensor:
    """Write ``qw`` (a :class:`lora_kernels.quant.QuantizedWeight`) dequantised into ``out``, a
    contiguous tensor with ``qw.numel()`` elements of fp32/fp16/bf16 on qw's device; returns out."""
    if out.dtype not in _OUT_KIND:
        raise TypeError(f"dequant_4bit writes {tuple(_OUT_KIND)}, got out of {out.dtype}")
    if not out.is_contiguous() or out.numel() != qw.numel():
        raise ValueError(f"out must be contiguous with {qw.numel()} elements, got shape {tuple(out.shape)}")
    ptrs, flags = quant_operands(qw, out.dtype)
    grid = (triton.cdiv(qw.numel(), BLOCK),)
    _dequant_4bit_kernel[grid](qw.packed, *ptrs, out, qw.numel(), **flags, INTERPRET=is_interpreter(), BLOCK=BLOCK,
                               enable_fp_fusion=False)
    return out

"""lora_kernels' own 4-bit quantiser (pure PyTorch), byte-for-byte equal to bitsandbytes' ``quantize_4bit``.

Per block of ``blocksize`` consecutive values of the flattened weight (fp32):
  absmax = max |w|;  w_n = clamp(w · (1 / max(absmax, 1e-38)), −1, 1)   (full blocks)
                     w_n = clamp(w / max(absmax, 1e-38), −1, 1)          (a final partial block)
  index  = the code entry nearest to w_n: bucketise against the midpoints of the sorted code
           (a value exactly on a midpoint goes to the lower entry); FP4's indices are its bit patterns.
Two indices per byte, the first in the high nibble (an odd count is padded with index 0 of value 0).

Double quantisation (``compress_statistics=True``): offset = mean(absmax) (fp32), then the
absmax − offset vector is quantised blockwise (blocksize 256) against the 256-entry signed dynamic
code the same way (scale by the block's max |.|, bucketise against the code's midpoints).

These are bitsandbytes' reference (torch) kernels, which it runs for quantize_4bit on CPU. Its CPU C
kernel for the 8-bit absmax (a vectorised binary search) picks the other neighbour for values
within ~1e-5 of a midpoint (about 1 in 1000 absmax entries; tests/test_quant_bnb.py counts them),
and its CUDA kernels were not compared here (no GPU). Whatever bytes a QuantState holds, the
dequantisation of them is exact.
"""
from __future__ import annotations


import torch

from .format import BLOCKSIZES, COMPUTE_DTYPES, QUANT_TYPES, NestedAbsmax, QuantizedWeight, code_table, dynamic_code

NESTED_BLOCKSIZE = 256


def _bounds(code: torch.Tensor):
    order = torch.argsort(code)  # same call as bitsandbytes, so ties (FP4's two zeros) resolve the same way
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order


def _scale_blocks(flat: torch.Tensor, blocksize: int):
    """(values scaled into [-1, 1] by their block's max |.|, fp32 absmax per block) of a flat fp32
    tensor, blocks running over it in order, the last one possibly short (as bitsandbytes does)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def quantize_codes(weight: torch.Tensor, quant_type: str, blocksize: int):
    """(packed uint8 (ceil(n/2), 1), absmax fp32 (blocks,)) of ``weight`` flattened."""
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = _bounds(code_table(quant_type, device=flat.device))
    idx = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        idx = order[idx]
    idx = idx.to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    return packed, absmax


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(uint8 indices, fp32 absmax per block) of ``values`` against the sorted 256-value ``code``,
    as bitsandbytes' reference (torch) blockwise quantiser: scale each block by its max |.|, then
    bucketise against the midpoints of the code (a value on a midpoint goes to the lower entry)."""
    flat = values.reshape(-1).float()
    scaled, absmax = _scale_blocks(flat, blocksize)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def quantize(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = False,
             dtype: torch.dtype | None = None) -> QuantizedWeight:
    """A :class:`QuantizedWeight` of the 2-D ``weight`` (bytes equal to bitsandbytes' quantize_4bit).

    Args:
        weight: (N, K) floating tensor (fp16/bf16/fp32; fp64 is accepted and read as fp32).
        quant_type: 'nf4' | 'fp4'. blocksize: one of BLOCKSIZES (bnb's default 64).
        compress_statistics: double-quantise the absmax (bnb's nested state, blocksize 256).
        dtype: compute dtype recorded in the state (default: weight's dtype; fp64 weights record fp32).
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating torch.Tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or inf entries; a 4-bit block cannot represent them")
    if dtype is None:
        dtype = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.float32
    packed, absmax = quantize_codes(weight, quant_type, blocksize)
    nested = None
    if compress_statistics:
        offset = absmax.mean()
        code2 = dynamic_code(device=absmax.device)
        qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code2, NESTED_BLOCKSIZE)
        nested = NestedAbsmax(absmax2, code2, NESTED_BLOCKSIZE, offset)
        absmax = qabsmax
    return QuantizedWeight(packed, absmax, tuple(weight.shape), quant_type, blocksize,
                           code_table(quant_type, device=weight.device), dtype, nested)

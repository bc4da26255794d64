"""Pure-PyTorch dequantiser, equal bit for bit to bitsandbytes' ``dequantize_4bit``.

    absmax_fp32 = code2[q] · absmax2[i // nested_blocksize]  (fp32),  then + offset   (nested only)
    W.flat[i]   = code[nibble(i)] · absmax_fp32[i // blocksize]                       (fp32)
    W           = round-to-nearest-even(W, dtype)

The two fp32 operations are done separately (no fused multiply-add), as bitsandbytes does.
"""
from __future__ import annotations

import torch

from .format import QuantizedWeight


def dequantize_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 per-block absmax of ``qw`` (undoing the nested quantisation when present)."""
    if qw.nested is None:
        return qw.absmax
    n = qw.nested
    q = qw.absmax.to(torch.int64)
    blocks = q.numel()
    scale = n.absmax.repeat_interleave(n.blocksize)[:blocks]
    absmax = n.code[q] * scale
    return absmax + n.offset


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The N·K 4-bit indices (int64, flat, row-major): high nibble first."""
    packed = qw.packed.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return idx[: qw.numel()].to(torch.int64)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """W (N, K) in ``dtype`` (default ``qw.dtype``; float64 is exact too: the fp32 values widened).

    ``out``: an optional contiguous (N, K) tensor of ``dtype`` to write into (a reused scratch buffer).
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a QuantizedWeight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    numel = qw.numel()
    absmax = dequantize_absmax(qw)
    values = qw.code[unpack_codes(qw)]
    blocks = absmax.numel()
    pad = blocks * qw.blocksize - numel
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    w = (values.view(blocks, qw.blocksize) * absmax.view(-1, 1)).reshape(-1)[:numel].reshape(qw.shape)
    if out is None:
        return w.to(dtype)
    if out.shape != qw.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(qw.shape)} tensor of {dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    return out.copy_(w)

"""DoRA's magnitude gradient: ``_dora_magnitude_grad_kernel`` and its launcher.

    dm_j = Σ_rows g_ij · h_ij / n_j        (h = xd·Wᵀ + s·u·Bᵀ saved by the forward, n detached)

A column reduction over tokens: programs own a block of columns and a fixed range of rows and
write fp32 partials that are summed in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def _dora_magnitude_grad_kernel(
    g_ptr, h_ptr, out_ptr,
    M, N,
    stride_gm, stride_gn, stride_hm, stride_hn, stride_os,
    rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g, h: M×N; out: S×N fp32 partial sums of g ⊙ h over each split's rows."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        inside = (offs_m < row_end)[:, None] & n_in[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=inside, other=0.0)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn, mask=inside, other=0.0)
        acc += tl.sum(g.to(tl.float32) * h.to(tl.float32), axis=0)
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + offs_n, acc, mask=n_in)


def dora_magnitude_grad_bwd(grad_y: torch.Tensor, h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """dm (N, fp32) = Σ_rows g ⊙ h / n."""
    M, N = grad_y.shape
    if M == 0:
        return torch.zeros(N, dtype=torch.float32, device=grad_y.device)
    meta = configs.fixed_config("dora_mag")
    block_m, block_n = meta["BLOCK_M"], meta["BLOCK_N"]
    n_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(configs.target_programs(grad_y.device), n_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, N), dtype=torch.float32, device=grad_y.device)
    _dora_magnitude_grad_kernel[(n_blocks, splits)](
        grad_y, h, partial, M, N,
        grad_y.stride(0), grad_y.stride(1), h.stride(0), h.stride(1), partial.stride(0),
        rows_per_split, **meta,
    )
    return partial.sum(0) / norm

"""Segmented gather-shrink for many adapters in one launch (SGMV-style): ``_lora_multi_shrink_kernel``.

Rows of the flattened input x (M×K) are grouped (see :mod:`lora_kernels.multi.plan`): group g owns
the positions ``[group_start[g], group_end[g])`` of a row list ``rows`` (original row numbers, so x
is gathered, never permuted in memory), and ``S`` adapter slots ``group_slots[g, :]`` (−1 = empty).
A mixed batch has one group per adapter and one slot; several active adapters are one group holding
every row, with one slot per active adapter.

Program (b, s) takes the BLOCK_M positions of row block b (a table ``blk_group`` / ``blk_start``
cut so that a block never straddles two groups) and computes, for adapter a = group_slots[g, s],

    u[s, pos, :R_a] = (x[rows[pos], :] ⊙ Z_a[rows[pos], :]) · A[a, :R_a, :]ᵀ

with Z_a the adapter's dropout mask regenerated from its own seed at the flat index rows[pos]·K + k
(the same mask as a single-adapter call on the whole batch). A is stacked [n_adapters, r_max, K]
(zero padded; rank R_a masked anyway). Blocks past the table's end (marked −1) exit at once, so the
grid can be sized from M and the number of groups without reading anything back from the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_multiplier, mma


@triton.jit
def _lora_multi_shrink_kernel(
    x_ptr, a_ptr, u_ptr, rows_ptr, blk_group_ptr, blk_start_ptr, group_end_ptr, group_slots_ptr,
    rank_ptr, seed_ptr, p_ptr, keep_ptr,
    K, S, R_MAX,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_us, stride_up, stride_ur, stride_gs,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: M×K (any strides); a: n_adapters×r_max×K; u: S×P×r_max (P = len(rows)); rows: P int64;
    blk_group / blk_start: T int32; group_end: G int32; group_slots: G×S int32;
    rank: n_adapters int32; seed: n_adapters int64; p, keep: n_adapters fp32 (p and 1/(1−p))."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.load(blk_group_ptr + pid_b)
    if g < 0:
        return
    adapter = tl.load(group_slots_ptr + g * stride_gs + pid_s)
    if adapter < 0:
        return
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(group_end_ptr + g)
    pos = start + tl.arange(0, BLOCK_M)
    pos_in = pos < end
    rows = tl.load(rows_ptr + pos, mask=pos_in, other=0)  # int64 row numbers of x
    rank = tl.load(rank_ptr + adapter)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < rank
    a_base = a_ptr + adapter.to(tl.int64) * stride_an
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + adapter)
        p = tl.load(p_ptr + adapter)
        keep = tl.load(keep_ptr + adapter)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=pos_in[:, None] & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            z = dropout_multiplier(seed, rows[:, None] * K + offs_k[None, :], p, keep)
            xt = (xt * z).to(x_ptr.dtype.element_ty)
        at = tl.load(a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_in[:, None] & r_in[None, :], other=0.0)
        acc = mma(xt, at, acc, DOT_FP32, INPUT_PRECISION)

    u_ptrs = u_ptr + pid_s.to(tl.int64) * stride_us + pos[:, None].to(tl.int64) * stride_up + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=pos_in[:, None] & (offs_r[None, :] < R_MAX))


def lora_multi_shrink_fwd(x: torch.Tensor, stacked_a: torch.Tensor, plan, ranks: torch.Tensor,
                          seeds: torch.Tensor, dropout_p: torch.Tensor, keep_scale: torch.Tensor,
                          has_dropout: bool) -> torch.Tensor:
    """u (S × P × r_max, x's dtype) for every (row block, slot) of ``plan`` in ONE launch.

    x: M×K; stacked_a: n×r_max×K; plan: a :class:`lora_kernels.multi.plan.RowPlan` built with
    ``block_m = multi_block_m(...)``. Columns of u past an adapter's rank are written as zeros.
    """
    K = x.shape[1]
    r_max = stacked_a.shape[1]
    S = plan.group_slots.shape[1]
    u = torch.empty((S, plan.rows.shape[0], r_max), dtype=x.dtype, device=x.device)
    if plan.rows.shape[0] == 0 or r_max == 0:
        return u.zero_()
    block_r = configs.block_rank(r_max)
    meta = multi_config("multi_shrink", block_r, x.element_size())
    if meta["BLOCK_M"] != plan.block_m:
        raise ValueError(f"plan was cut into blocks of {plan.block_m} rows, the kernel uses {meta['BLOCK_M']}")
    grid = (plan.blk_group.shape[0], S)
    _lora_multi_shrink_kernel[grid](
        x, stacked_a, u, plan.rows, plan.blk_group, plan.blk_start, plan.group_end, plan.group_slots,
        ranks, seeds, dropout_p, keep_scale,
        K, S, r_max,
        x.stride(0), x.stride(1), stacked_a.stride(0), stacked_a.stride(1), stacked_a.stride(2),
        u.stride(0), u.stride(1), u.stride(2), plan.group_slots.stride(0),
        HAS_DROPOUT=has_dropout, DOT_FP32=configs.dot_fp32(), INPUT_PRECISION=configs.input_precision(x.dtype),
        BLOCK_R=block_r, **meta,
    )
    return u


# Block sizes, as data. BLOCK_M is fixed per call (the row-block table is cut with it before the
# launch), so these kernels are not autotuned over BLOCK_M. GPU: BLOCK_M = 16 (decode batches give a
# few rows per adapter; tl.dot's minimum); the K tile (shrink) / N tile (expand) and warps per
# (padded rank, fp32 or not) are the largest spill-free choice of a compile-only sm_90a review
# (Triton 3.9 and 3.6, cuobjdump --dump-resource-usage: 0 bytes of stack for every entry); not timed yet.
MULTI_INTERPRETER_CONFIG = {
    "multi_shrink": dict(BLOCK_M=16, BLOCK_K=64),
    "multi_expand": dict(BLOCK_M=16, BLOCK_N=64),
}
_MULTI_GPU_TABLE = {  # (kind, fp32?) -> {BLOCK_R: (tile, num_warps)}
    ("multi_shrink", False): {16: (128, 4), 32: (128, 4), 64: (128, 4), 128: (128, 8), 256: (64, 8)},
    ("multi_shrink", True): {16: (128, 4), 32: (128, 4), 64: (128, 8), 128: (64, 8), 256: (32, 8)},
    ("multi_expand", False): {16: (128, 4), 32: (128, 4), 64: (128, 8), 128: (64, 8), 256: (32, 8)},
    ("multi_expand", True): {16: (128, 4), 32: (64, 8), 64: (64, 8), 128: (16, 8), 256: (16, 8)},
}


def multi_config(kind: str, block_r: int = 16, elem_bytes: int = 2) -> dict:
    """Meta-parameters of the multi-adapter kernels (interpreter: small fixed blocks; GPU: the table)."""
    if configs.is_interpreter():
        return dict(MULTI_INTERPRETER_CONFIG[kind])
    tile, warps = _MULTI_GPU_TABLE[(kind, elem_bytes >= 4)][max(16, block_r)]
    wide = "BLOCK_K" if kind == "multi_shrink" else "BLOCK_N"
    return {"BLOCK_M": 16, wide: tile, "num_warps": warps, "num_stages": 3}


def multi_block_m() -> int:
    """The BLOCK_M both multi-adapter kernels use (the row plan must be cut with it)."""
    a = multi_config("multi_shrink")["BLOCK_M"]
    b = multi_config("multi_expand")["BLOCK_M"]
    assert a == b, "multi_shrink and multi_expand must share BLOCK_M"
    return a

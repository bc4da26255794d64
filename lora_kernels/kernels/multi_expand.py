"""Segmented expand-add for many adapters in one launch (SGMV-style): ``_lora_multi_expand_kernel``.

Adds the adapters' outputs into y (M×N), which already holds the base layer's x·Wᵀ + b (cuBLAS).
Program (b, n) takes row block b of the plan (see :mod:`.multi_shrink`), gathers those rows of y
once, applies the group's adapter slots in order, and writes the rows back once:

    for each slot s with adapter a:   y ← y + (c_a − 1) ⊙ (y − b) + c_a ⊙ scale_a · u[s]·B[a]ᵀ

c_a (N values) is DoRA's m/n for a DoRA adapter and exactly 1 for a LoRA adapter (the update is then
y + s·u·Bᵀ). Applying slots in order over a running y is PEFT's semantics for several active
adapters in eval (a later DoRA adapter rescales the earlier adapters' contributions too; see
docs/multi-adapter.md). A row belongs to one group, so no two programs write the same element:
no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import keep_tile, mma
from .multi_shrink import check_dropout_tensors, multi_config


@triton.jit
def _lora_multi_expand_kernel(
    y_ptr, u_ptr, b_ptr, bias_ptr, c_ptr, rows_ptr, blk_group_ptr, blk_start_ptr, group_end_ptr,
    group_slots_ptr, rank_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr,
    N, S, mask_row_len,
    stride_ym, stride_yn, stride_us, stride_up, stride_ur, stride_bn_, stride_bo, stride_br,
    stride_cn_, stride_co, stride_gs,
    HAS_DORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y: M×N (read and written, gathered rows); u: S×P×r_max; b: n_adapters×N×r_max;
    bias: N (HAS_BIAS); c: n_adapters×N fp32 (HAS_DORA); rank: n int32; scale: n fp32;
    rows/blk_group/blk_start/group_end/group_slots: the row plan (see the shrink kernel);
    HAS_DROPOUT: seed n×2 int32 (lo, hi words), thr n int32, keep n fp32 (1/(1 − p_eff)); the mask
    is that of an M×mask_row_len input (BLOCK_N a multiple of 16)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(blk_group_ptr + pid_b)
    if g < 0:
        return
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(group_end_ptr + g)
    pos = start + tl.arange(0, BLOCK_M)
    pos_in = pos < end
    rows = tl.load(rows_ptr + pos, mask=pos_in, other=0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    tile_in = pos_in[:, None] & n_in[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=tile_in, other=0.0).to(tl.float32)
    if HAS_DORA and HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)

    u_slot = u_ptr  # advanced by a slot's stride each step (64-bit pointer arithmetic)
    for s in range(0, S):
        adapter = tl.load(group_slots_ptr + g * stride_gs + s)
        if adapter >= 0:
            rank = tl.load(rank_ptr + adapter)
            scale = tl.load(scale_ptr + adapter)
            r_in = offs_r < rank
            ut = tl.load(u_slot + pos[:, None].to(tl.int64) * stride_up + offs_r[None, :] * stride_ur,
                         mask=pos_in[:, None] & r_in[None, :], other=0.0)
            bt = tl.load(b_ptr + adapter.to(tl.int64) * stride_bn_ + offs_r[:, None] * stride_br
                         + offs_n[None, :] * stride_bo, mask=r_in[:, None] & n_in[None, :], other=0.0)
            delta = mma(ut, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, INPUT_PRECISION) * scale
            if HAS_DROPOUT:  # backward's dx: s·(v·A) ⊙ Z_a, the mask of element (rows, k) regenerated
                keep = keep_tile(tl.load(seed_ptr + 2 * adapter), tl.load(seed_ptr + 2 * adapter + 1),
                                 tl.load(thr_ptr + adapter), rows, pid_n.to(tl.int64) * BLOCK_N,
                                 tl.cdiv(mask_row_len, 16), BLOCK_M, BLOCK_N)
                delta = delta * tl.where(keep, tl.load(keep_ptr + adapter), 0.0)  # a product: NaN propagates
            if HAS_DORA:
                c = tl.load(c_ptr + adapter.to(tl.int64) * stride_cn_ + offs_n * stride_co, mask=n_in, other=1.0)
                base = y
                if HAS_BIAS:
                    base = y - bias[None, :]
                y = y + (c[None, :] - 1.0) * base + c[None, :] * delta
            else:
                y = y + delta
        u_slot += stride_us
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tile_in)


def lora_multi_expand_fwd(y: torch.Tensor, u: torch.Tensor, stacked_b: torch.Tensor, plan, ranks: torch.Tensor,
                          scales: torch.Tensor, bias: torch.Tensor | None = None,
                          dora_scale: torch.Tensor | None = None, seed_words: torch.Tensor | None = None,
                          threshold: torch.Tensor | None = None, keep_scale: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """y[rows] ← slots applied in order (see the module docstring), in place, in ONE launch. Returns y.

    y: M×N (the base output, bias included); u: S×P×r_max from ``lora_multi_shrink_fwd``;
    stacked_b: n×N×r_max; scales: n fp32; dora_scale: n×N fp32 (c, 1 for LoRA adapters) or None;
    bias: N (needed with dora_scale to recover x·Wᵀ from y). ``seed_words`` (n×2 int32) /
    ``threshold`` (n int32) / ``keep_scale`` (n fp32), see ``check_dropout_tensors``: multiply each
    adapter's term by its dropout mask Z_a of an M×N input at element (row, col) (the backward's
    dx = g·W + s·(v·A) ⊙ Z, with y = g·W and b = stacked A viewed n×K×r_max).
    """
    N = y.shape[1]
    S = plan.group_slots.shape[1]
    r_max = stacked_b.shape[2]
    if plan.rows.shape[0] == 0 or r_max == 0 or N == 0:
        return y
    block_r = configs.block_rank(r_max)
    meta = multi_config("multi_expand", block_r, y.element_size())
    if meta["BLOCK_M"] != plan.block_m:
        raise ValueError(f"plan was cut into blocks of {plan.block_m} rows, the kernel uses {meta['BLOCK_M']}")
    has_dora = dora_scale is not None
    has_bias = bias is not None
    has_dropout = seed_words is not None
    if has_dropout:
        check_dropout_tensors(stacked_b.shape[0], seed_words, threshold, keep_scale, y.device)
    c = dora_scale if has_dora else scales  # a placeholder pointer when unused
    grid = (plan.blk_group.shape[0], triton.cdiv(N, meta["BLOCK_N"]))
    _lora_multi_expand_kernel[grid](
        y, u, stacked_b, bias if has_bias else y, c, plan.rows, plan.blk_group, plan.blk_start, plan.group_end,
        plan.group_slots, ranks, scales,
        seed_words if has_dropout else ranks, threshold if has_dropout else ranks, keep_scale if has_dropout else scales,
        N, S, N,
        y.stride(0), y.stride(1), u.stride(0), u.stride(1), u.stride(2),
        stacked_b.stride(0), stacked_b.stride(1), stacked_b.stride(2),
        c.stride(0), c.stride(1) if has_dora else 0, plan.group_slots.stride(0),
        HAS_DORA=has_dora, HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(y.dtype), BLOCK_R=block_r, **meta,
    )
    return y

"""The backward of a shared-input projection group's LoRA terms in one launch: ``_lora_group_grad_kernel``.

With v_i = g_i·B_i (M×r_i, all members side by side in one M×Σr buffer) and dx holding the base part
Σ_i g_i·W_i on entry (cuBLAS, accumulated into one buffer), one launch computes

    dA_i = s_i·v_iᵀ·(x ⊙ Z_i)        for every member i            (r_i × K)
    dx  += Σ_i s_i·(v_i·A_i) ⊙ Z_i   one read and one write of dx   (M × K)

Two kinds of programs (no partial sums, no atomics, deterministic):

- the first ``cdiv(K, BLOCK_K)`` programs own one K block of every member's dA and walk all M rows
  in a fixed order, loading each x tile ONCE and applying each member's mask to it in registers;
- the others own one BLOCK_M × BLOCK_K tile of dx (M blocks fastest), read it, add every member's
  rank term (keep bits regenerated from the member's seed) and write it once.

Z_i is member i's mask of :mod:`lora_kernels.dropout`, the same bits the forward used; it is never
stored. Seeds are int32 words listed in ``do_not_specialize``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import dropout_threshold, keep_scale
from . import configs
from .dropout import apply_keep, keep_tile, mma
from .group_shrink import LAUNCHES, MAX_MEMBERS, check_members, group_config, member_args, seed_words


@triton.jit
def _member_da(acc, xt, v_ptr, OFF, R, offs_m, m_in, offs_r, k_start, k_groups, stride_vm, stride_vr,
               seed_lo, seed_hi, threshold,
               HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """accᵀ-tile (BLOCK_K × BLOCK_R) + (keep_i ⊙ x tile)ᵀ·v_i tile."""
    if HAS_DROPOUT:
        keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, k_start, k_groups, BLOCK_M, BLOCK_K)
        xt = apply_keep(xt, keep, DOT_FP32)
    v = tl.load(v_ptr + offs_m[:, None] * stride_vm + (OFF + offs_r[None, :]) * stride_vr,
                mask=m_in[:, None] & (offs_r[None, :] < R), other=0.0)
    return mma(tl.trans(xt), v, acc, DOT_FP32, INPUT_PRECISION)


@triton.jit
def _store_da(acc, da_ptr, R, offs_k, k_in, offs_r, stride_dar, scale):
    tl.store(da_ptr + offs_r[None, :] * stride_dar + offs_k[:, None], (acc * scale).to(da_ptr.dtype.element_ty),
             mask=k_in[:, None] & (offs_r[None, :] < R))


@triton.jit
def _member_dx(acc, v_ptr, a_ptr, OFF, R, offs_m, m_in, offs_k, k_in, offs_r, k_start, k_groups,
               stride_vm, stride_vr, stride_ar, scale, keep_mult, seed_lo, seed_hi, threshold,
               HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + s_i·(v_i·A_i) ⊙ Z_i on one dx tile (v pre-scaled by s_i in fp32, rounded to its dtype)."""
    r_in = offs_r < R
    v = tl.load(v_ptr + offs_m[:, None] * stride_vm + (OFF + offs_r[None, :]) * stride_vr,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :], mask=r_in[:, None] & k_in[None, :],
                other=0.0)
    v_s = (v.to(tl.float32) * scale).to(v_ptr.dtype.element_ty)
    if HAS_DROPOUT:
        keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, k_start, k_groups, BLOCK_M, BLOCK_K)
        va = mma(v_s, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
        return acc + va * tl.where(keep, keep_mult, 0.0)  # a product: NaN in v·A propagates
    return mma(v_s, a, acc, DOT_FP32, INPUT_PRECISION)


@triton.jit(do_not_specialize=["lo0", "hi0", "lo1", "hi1", "lo2", "hi2", "lo3", "hi3"])
def _lora_group_grad_kernel(
    x_ptr, v_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, da0_ptr, da1_ptr, da2_ptr, da3_ptr, dx_ptr,
    M, K, R0, R1, R2, R3, OFF1, OFF2, OFF3,
    stride_xm, stride_xk, stride_vm, stride_vr, stride_ar0, stride_ar1, stride_ar2, stride_ar3,
    stride_dar0, stride_dar1, stride_dar2, stride_dar3, stride_dxm, stride_dxk,
    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, threshold, keep_mult, s0, s1, s2, s3,
    MEMBERS: tl.constexpr, COMPUTE_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: M×K (any strides); v: M×Σr (member i from column OFF_i, OFF0 = 0); a_i, da_i: R_i×K (unit
    stride along K); dx: M×K holding Σ g_i·W_i on entry (COMPUTE_DX). s_i: member scales; keep_mult:
    the keep-scale 1/(1 − p_eff) (1 without dropout); threshold: the shared 8-bit t."""
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_K)
    k_groups = tl.cdiv(K, 16)  # dropout groups per row (lora_kernels/dropout.py: G = 16)
    offs_r = tl.arange(0, BLOCK_R)
    if pid < k_blocks:
        # ---- dA of every member: one K block, all rows, fixed order; each x tile read once ----
        k_start = pid.to(tl.int64) * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        acc0 = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m_in = offs_m < M
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_in[:, None] & k_in[None, :], other=0.0)
            acc0 = _member_da(acc0, xt, v_ptr, 0, R0, offs_m, m_in, offs_r, k_start, k_groups, stride_vm,
                              stride_vr, lo0, hi0, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION,
                              BLOCK_M, BLOCK_K)
            if MEMBERS > 1:
                acc1 = _member_da(acc1, xt, v_ptr, OFF1, R1, offs_m, m_in, offs_r, k_start, k_groups, stride_vm,
                                  stride_vr, lo1, hi1, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION,
                                  BLOCK_M, BLOCK_K)
            if MEMBERS > 2:
                acc2 = _member_da(acc2, xt, v_ptr, OFF2, R2, offs_m, m_in, offs_r, k_start, k_groups, stride_vm,
                                  stride_vr, lo2, hi2, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION,
                                  BLOCK_M, BLOCK_K)
            if MEMBERS > 3:
                acc3 = _member_da(acc3, xt, v_ptr, OFF3, R3, offs_m, m_in, offs_r, k_start, k_groups, stride_vm,
                                  stride_vr, lo3, hi3, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION,
                                  BLOCK_M, BLOCK_K)
        _store_da(acc0, da0_ptr, R0, offs_k, k_in, offs_r, stride_dar0, s0 * keep_mult)
        if MEMBERS > 1:
            _store_da(acc1, da1_ptr, R1, offs_k, k_in, offs_r, stride_dar1, s1 * keep_mult)
        if MEMBERS > 2:
            _store_da(acc2, da2_ptr, R2, offs_k, k_in, offs_r, stride_dar2, s2 * keep_mult)
        if MEMBERS > 3:
            _store_da(acc3, da3_ptr, R3, offs_k, k_in, offs_r, stride_dar3, s3 * keep_mult)
    elif COMPUTE_DX:
        # ---- dx: one tile, every member's rank term, one read and one write ----
        tile = pid - k_blocks
        m_blocks = tl.cdiv(M, BLOCK_M)
        pid_m = tile % m_blocks
        pid_k = tile // m_blocks
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_start = pid_k.to(tl.int64) * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        m_in = offs_m < M
        k_in = offs_k < K
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        acc = tl.load(dx_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        acc = _member_dx(acc, v_ptr, a0_ptr, 0, R0, offs_m, m_in, offs_k, k_in, offs_r, k_start, k_groups,
                         stride_vm, stride_vr, stride_ar0, s0, keep_mult, lo0, hi0, threshold,
                         HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 1:
            acc = _member_dx(acc, v_ptr, a1_ptr, OFF1, R1, offs_m, m_in, offs_k, k_in, offs_r, k_start, k_groups,
                             stride_vm, stride_vr, stride_ar1, s1, keep_mult, lo1, hi1, threshold,
                             HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 2:
            acc = _member_dx(acc, v_ptr, a2_ptr, OFF2, R2, offs_m, m_in, offs_k, k_in, offs_r, k_start, k_groups,
                             stride_vm, stride_vr, stride_ar2, s2, keep_mult, lo2, hi2, threshold,
                             HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 3:
            acc = _member_dx(acc, v_ptr, a3_ptr, OFF3, R3, offs_m, m_in, offs_k, k_in, offs_r, k_start, k_groups,
                             stride_vm, stride_vr, stride_ar3, s3, keep_mult, lo3, hi3, threshold,
                             HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_in[:, None] & k_in[None, :])


def lora_group_grad_bwd(x: torch.Tensor, v: torch.Tensor, lora_as: list[torch.Tensor], scales: list[float],
                        seeds: list[int], dropout_p: float, dx: torch.Tensor | None) -> list[torch.Tensor]:
    """dA_i (r_i×K, x's dtype) of every member, and, if ``dx`` (M×K, holding Σ g_i·W_i) is given,
    dx += Σ s_i·(v_i·A_i) ⊙ Z_i in place, in ONE launch. v: M×Σr (member i's v_i in its columns)."""
    check_members(lora_as)
    M, K = x.shape
    ranks = [a.shape[0] for a in lora_as]
    grads = [torch.empty((r, K), dtype=x.dtype, device=x.device) for r in ranks]
    if M == 0 or K == 0:
        return [g.zero_() for g in grads]
    offs = [sum(ranks[:i]) for i in range(MAX_MEMBERS)]
    rs = ranks + [0] * (MAX_MEMBERS - len(ranks))
    a_args, da_args = member_args(lora_as), member_args(grads)
    has_dropout = dropout_p > 0.0
    block_r = configs.block_rank(max(ranks))
    meta = group_config("group_grad", block_r, x.element_size(), len(lora_as))
    compute_dx = dx is not None
    k_blocks = triton.cdiv(K, meta["BLOCK_K"])
    grid = (k_blocks + (triton.cdiv(M, meta["BLOCK_M"]) * k_blocks if compute_dx else 0),)
    dx_arg = dx if compute_dx else x  # never written without COMPUTE_DX
    LAUNCHES["group_grad"] += 1
    _lora_group_grad_kernel[grid](
        x, v, *a_args, *da_args, dx_arg,
        M, K, *rs, *offs[1:],
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), *(a.stride(0) for a in a_args),
        *(d.stride(0) for d in da_args), dx_arg.stride(0), dx_arg.stride(1),
        *seed_words(seeds), dropout_threshold(dropout_p), keep_scale(dropout_p) if has_dropout else 1.0,
        *(float(s) for s in list(scales) + [0.0] * (MAX_MEMBERS - len(scales))),
        MEMBERS=len(lora_as), COMPUTE_DX=compute_dx, HAS_DROPOUT=has_dropout, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(x.dtype), BLOCK_R=block_r, **meta,
    )
    return grads

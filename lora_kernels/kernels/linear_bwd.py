"""Backward dx GEMM with the mask-aware LoRA epilogue, and dA, in one launch: ``_lora_linear_bwd_kernel``.

    LoRA:            dx = g·W + s·(v·A) ⊙ Z                        dA = s·vᵀ·(x ⊙ Z),  v = g·B
    DoRA, no drop:   dx = gc·W + s·(v·A)                            v = gc·B, gc = g ⊙ c
    DoRA, dropout:   dx = g·W + Z ⊙ (gc·W − g·W + s·v·A)           (= g·W + Z ⊙ ((g⊙(c−1))·W + s·v·A))

Two kinds of programs share the launch (no partial sums, no finishing kernel, no atomics):

- the first ``cdiv(K, BLOCK_K)`` programs own one K block of dA each and walk all M rows in a
  fixed order: dAᵀ_tile += (x ⊙ keep)ᵀ·v (a wgmma-shaped dot: BLOCK_K × BLOCK_R), scaled by
  s·keep_scale and cast once at the end — deterministic;
- the others own one BLOCK_M × BLOCK_K tile of dx each (COMPUTE_DX), the tile index running over M
  first: consecutive programs share one K panel of W (N × BLOCK_K), so a wave of programs on the
  GPU covers all M blocks of a few K panels and W is streamed from HBM about once
  (docs/architecture.md has the traffic model). BASE_GEMM: the tile walks N and computes g·W
  itself (the fused path); otherwise it reads cuBLAS's g·W from dx (the hybrid path). The epilogue
  regenerates the keep bits of the tile and adds (s·v·A)·where(keep, keep_scale, 0) (a product,
  NaN-propagating like the reference); without dropout s·v·A is folded into the accumulator.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import dropout_threshold, keep_scale, seed_halves
from . import configs
from .dequant import load_w4, weight_operands
from .dropout import apply_keep, keep_tile, mma


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lora_linear_bwd_kernel(
    g_ptr, w_ptr, v_ptr, a_ptr, x_ptr, c_ptr, aux_ptr, dx_ptr, da_ptr,
    absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_vm, stride_vr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_auxm, stride_auxk, stride_dxm, stride_dxk, stride_dar, stride_dak,
    seed_lo, seed_hi, threshold, keep_mult, da_scale, scale,
    KEY_TOKENS,  # autotune key only (tokens bucketed to a power of two)
    BASE_GEMM: tl.constexpr, COMPUTE_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DORA: tl.constexpr, DORA_DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr = False, W_KIND: tl.constexpr = 0, QBLOCK: tl.constexpr = 1, QBLOCK2: tl.constexpr = 1,
    NESTED: tl.constexpr = False, IDX64: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    """g: M×N, w: N×K, v: M×R, a: R×K, x: M×K, c: N (fp32, DoRA), dx: M×K, da: R×K.

    keep_mult = keep_scale (1/(1 − p_eff)), da_scale = s·keep_scale (s without dropout), scale = s.
    QUANT (BASE_GEMM only): w_ptr is a 4-bit weight's packed bytes (flat N×K) with its absmax / code /
    nested operands; each W tile of the dx loop is decoded in registers by :func:`.dequant.load_w4`.
    When not BASE_GEMM, dx holds cuBLAS's g·W (DoRA: gc·W) on entry and, for DoRA with dropout,
    aux (M×K) holds g·W.
    """
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_K)
    k_groups = tl.cdiv(K, 16)  # dropout groups per row (lora_kernels/dropout.py: G = 16)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    if pid < k_blocks:
        # ---- dA: one K block, all rows, fixed order ----
        offs_k = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        da_t = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m_in = offs_m < M
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_in[:, None] & k_in[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, pid.to(tl.int64) * BLOCK_K, k_groups,
                                 BLOCK_M, BLOCK_K)
                x = apply_keep(x, keep, DOT_FP32)
            v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                        mask=m_in[:, None] & r_in[None, :], other=0.0)
            da_t = mma(tl.trans(x), v, da_t, DOT_FP32, INPUT_PRECISION)
        da_t = da_t * da_scale
        tl.store(da_ptr + offs_r[None, :] * stride_dar + offs_k[:, None] * stride_dak,
                 da_t.to(da_ptr.dtype.element_ty), mask=k_in[:, None] & r_in[None, :])
    elif COMPUTE_DX:
        # ---- dx: one BLOCK_M × BLOCK_K tile; M blocks vary fastest (W panels reused from L2) ----
        tile = pid - k_blocks
        m_blocks = tl.cdiv(M, BLOCK_M)
        pid_m = tile % m_blocks
        pid_k = tile // m_blocks
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_in = offs_m < M
        k_in = offs_k < K
        tile_in = m_in[:, None] & k_in[None, :]
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=m_in[:, None] & r_in[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_in[:, None] & k_in[None, :], other=0.0)
        # acc: g·W (DoRA: gc·W; DoRA with dropout: (g ⊙ (c − 1))·W, beside acc_plain = g·W)
        acc_plain = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if BASE_GEMM:
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                n_in = offs_n < N
                g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                            mask=m_in[:, None] & n_in[None, :], other=0.0)
                if QUANT:
                    w = load_w4(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                pid_k.to(tl.int64) * BLOCK_K, N, K, QBLOCK, QBLOCK2, NESTED, W_KIND, IDX64,
                                BLOCK_N, BLOCK_K, INTERPRET)
                else:
                    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                                mask=n_in[:, None] & k_in[None, :], other=0.0)
                if DORA:
                    c = tl.load(c_ptr + offs_n, mask=n_in, other=0.0)
                    if DORA_DROPOUT:
                        gc = (g * (c[None, :] - 1.0)).to(g_ptr.dtype.element_ty)
                        acc_plain = mma(g, w, acc_plain, DOT_FP32, INPUT_PRECISION)
                    else:
                        gc = (g * c[None, :]).to(g_ptr.dtype.element_ty)
                    acc = mma(gc, w, acc, DOT_FP32, INPUT_PRECISION)
                else:
                    acc = mma(g, w, acc, DOT_FP32, INPUT_PRECISION)
        else:
            acc = tl.load(dx_ptrs, mask=tile_in, other=0.0).to(tl.float32)
            if DORA_DROPOUT:
                acc_plain = tl.load(aux_ptr + offs_m[:, None] * stride_auxm + offs_k[None, :] * stride_auxk,
                                    mask=tile_in, other=0.0).to(tl.float32)
                acc = acc - acc_plain  # gc·W − g·W = (g ⊙ (c − 1))·W
        # s·v·A (v pre-scaled by s in fp32 and rounded to its dtype, as in the forward)
        v_s = (v.to(tl.float32) * scale).to(v_ptr.dtype.element_ty)
        if DORA_DROPOUT:
            # g·W + Z ⊙ ((g ⊙ (c − 1))·W + s·v·A): the rank term folded into acc (two tiles live)
            acc = mma(v_s, a, acc, DOT_FP32, INPUT_PRECISION)
            keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, pid_k.to(tl.int64) * BLOCK_K, k_groups,
                             BLOCK_M, BLOCK_K)
            acc = acc_plain + acc * tl.where(keep, keep_mult, 0.0)  # a product: NaN propagates
        elif HAS_DROPOUT:
            keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, pid_k.to(tl.int64) * BLOCK_K, k_groups,
                             BLOCK_M, BLOCK_K)
            va = mma(v_s, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
            acc = acc + va * tl.where(keep, keep_mult, 0.0)  # a product: NaN in v·A propagates
        else:
            acc = mma(v_s, a, acc, DOT_FP32, INPUT_PRECISION)  # no mask: folded into the accumulator
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile_in)


_lora_linear_bwd_tuned = triton.autotune(
    configs=configs.autotune_configs("linear_bwd"),
    key=["KEY_TOKENS", "N", "K", "R", "BASE_GEMM", "COMPUTE_DX", "HAS_DROPOUT", "DORA", "DORA_DROPOUT", "QUANT",
         "NESTED"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("linear_bwd")},
    restore_value=["dx_ptr"],  # the hybrid path accumulates into dx
)(_lora_linear_bwd_kernel)


def _grid(M, K, block_m, block_k, compute_dx):
    k_blocks = triton.cdiv(K, block_k)
    return (k_blocks + (triton.cdiv(M, block_m) * k_blocks if compute_dx else 0),)


def lora_linear_bwd(grad_y, weight, v, lora_a, x, scale: float, seed: int, dropout_p: float,
                    dx=None, compute_dx: bool = True, dora_scale=None, aux=None):
    """dx and dA of DESIGN.md §2/§3 from g (M×N), W (N×K), v (M×r), A (r×K), x (M×K).

    Fused: dx is None and compute_dx -> dx is allocated and g·W computed in the kernel.
    Hybrid: dx given (holding g·W from cuBLAS; DoRA: gc·W) -> the LoRA term is added in place.
    compute_dx=False -> only dA. ``weight`` may be a :class:`lora_kernels.quant.QuantizedWeight` on
    the fused path (dx None): its tiles are decoded inside the N loop (no N×K tensor is written).
    DoRA: ``dora_scale`` c (N, fp32; v must be gc·B); with dropout the hybrid path also passes
    ``aux`` = g·W. Returns (dx or None, dA) with dA in x's dtype.
    """
    M, K = x.shape
    N = grad_y.shape[1]
    R = lora_a.shape[0]
    base_gemm = compute_dx and dx is None
    dora = dora_scale is not None
    has_dropout = dropout_p > 0.0
    dora_dropout = dora and has_dropout
    w, stride_wn, stride_wk, quant_ptrs, quant_flags = weight_operands(weight, x.dtype, x)
    if quant_flags["QUANT"] and dx is not None:
        raise ValueError("a 4-bit weight is decoded inside the fused dx GEMM only (dx must be None)")
    if base_gemm:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    grad_a = torch.empty((R, K), dtype=x.dtype, device=x.device)
    if M == 0 or K == 0:
        return (dx if compute_dx else None), grad_a.zero_()
    dx_arg = dx if compute_dx else x  # never written when COMPUTE_DX is False
    aux_arg = aux if (dora_dropout and not base_gemm and compute_dx) else x
    seed_lo, seed_hi = seed_halves(seed)
    ks = keep_scale(dropout_p) if has_dropout else 1.0
    args = (
        grad_y, w, v, lora_a, x, dora_scale if dora else x, aux_arg, dx_arg, grad_a, *quant_ptrs,
        M, N, K, R,
        grad_y.stride(0), grad_y.stride(1), stride_wn, stride_wk,
        v.stride(0), v.stride(1), lora_a.stride(0), lora_a.stride(1),
        x.stride(0), x.stride(1), aux_arg.stride(0), aux_arg.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        grad_a.stride(0), grad_a.stride(1),
        seed_lo, seed_hi, dropout_threshold(dropout_p), ks, float(scale) * ks, float(scale),
        configs.m_bucket(M),
    )
    flags = dict(
        BASE_GEMM=base_gemm, COMPUTE_DX=compute_dx, HAS_DROPOUT=has_dropout, DORA=dora,
        DORA_DROPOUT=dora_dropout, DOT_FP32=configs.dot_fp32(), INPUT_PRECISION=configs.input_precision(x.dtype),
        BLOCK_R=configs.block_rank(R), **quant_flags,
    )
    if configs.use_fixed_config():
        meta = configs.fixed_config("linear_bwd", flags["BLOCK_R"], x.element_size(), flags)
        grid = _grid(M, K, meta["BLOCK_M"], meta["BLOCK_K"], compute_dx)
        _lora_linear_bwd_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda META: _grid(M, K, META["BLOCK_M"], META["BLOCK_K"], compute_dx)  # noqa: E731
        _lora_linear_bwd_tuned[grid](*args, **flags)
    return (dx if compute_dx else None), grad_a

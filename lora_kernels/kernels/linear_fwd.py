"""Forward GEMM with the LoRA expand in its epilogue: ``_lora_linear_fwd_kernel`` and its launcher.

    LoRA:            y = x·Wᵀ + b + s·u·Bᵀ                      (u = (x ⊙ Z)·Aᵀ from :mod:`.shrink`)
    DoRA:            P = x·Wᵀ (no dropout) or xd·Wᵀ (dropout, xd = x ⊙ Z),  h = P + s·u·Bᵀ,
                     y = (x·Wᵀ + b) + ((c − 1) ⊙ P + c ⊙ s·u·Bᵀ)      (PEFT's formula; at init,
                     c == 1 and B == 0, y equals the base output bit for bit), evaluated as
                     y = (x·Wᵀ + b + s·u·Bᵀ) + (c − 1) ⊙ h

BASE_GEMM=True is the fused path: the kernel computes x·Wᵀ (and xd·Wᵀ, sharing each W tile)
itself and writes y (and h) once. BASE_GEMM=False is the hybrid path: cuBLAS already wrote x·Wᵀ + b
into y and, for DoRA with dropout, xd·Wᵀ into h; the kernel finishes them in place (DoRA without
dropout gets b as well, to recover x·Wᵀ = y − b).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dequant import load_w4, weight_operands
from .dropout import mma


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, xd_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, c_ptr, y_ptr, h_ptr,
    absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_xdm, stride_xdk, stride_wn, stride_wk, stride_um, stride_ur,
    stride_bn, stride_br, stride_ym, stride_yn, stride_hm, stride_hn,
    scale,
    KEY_TOKENS,  # autotune key only (tokens bucketed to a power of two)
    BASE_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, DORA: tl.constexpr, DORA_DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    QUANT: tl.constexpr = False, W_KIND: tl.constexpr = 0, QBLOCK: tl.constexpr = 1, QBLOCK2: tl.constexpr = 1,
    NESTED: tl.constexpr = False, IDX64: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    """x, xd: M×K, w: N×K, bias: N, u: M×R, b (lora_b): N×R, c: N (fp32), y, h: M×N.

    QUANT (fused path only): w_ptr is a 4-bit weight's packed bytes (bitsandbytes' flat N×K layout,
    ceil(N·K/2) uint8) with its absmax / code / nested operands, and each W tile is decoded in
    registers by :func:`.dequant.load_w4` into W_KIND (x's dtype), never written to memory.

    y is an input too when not BASE_GEMM (and h when DORA_DROPOUT and not BASE_GEMM). HAS_BIAS:
    BASE_GEMM adds b; otherwise y already holds it (DoRA subtracts it to recover x·Wᵀ).
    """
    # Grouped ordering: GROUP_M row-blocks share each column panel of W while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    n_in = offs_n < N
    tile_in = m_in[:, None] & n_in[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn

    acc_dropped = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # xd·Wᵀ (DoRA with dropout only)
    if BASE_GEMM:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_in = offs_k < K
            if QUANT:
                w = tl.trans(load_w4(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
                                     QBLOCK, QBLOCK2, NESTED, W_KIND, IDX64, BLOCK_N, BLOCK_K, INTERPRET))
            else:
                w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=k_in[:, None] & n_in[None, :], other=0.0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_in[:, None] & k_in[None, :], other=0.0)
            acc = mma(x, w, acc, DOT_FP32, INPUT_PRECISION)
            if DORA_DROPOUT:
                xd = tl.load(xd_ptr + offs_m[:, None] * stride_xdm + offs_k[None, :] * stride_xdk,
                             mask=m_in[:, None] & k_in[None, :], other=0.0)
                acc_dropped = mma(xd, w, acc_dropped, DOT_FP32, INPUT_PRECISION)
    else:
        acc = tl.load(y_ptrs, mask=tile_in, other=0.0).to(tl.float32)  # x·Wᵀ (+ b)
        if DORA_DROPOUT:
            acc_dropped = tl.load(h_ptrs, mask=tile_in, other=0.0).to(tl.float32)

    r_in = offs_r < R
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=r_in[:, None] & n_in[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    # The expand is folded into the accumulators: one dot with acc (u pre-scaled by s in fp32 and
    # rounded to u's dtype: one extra rounding of s·u, like storing u itself in that dtype).
    u_s = (u.to(tl.float32) * scale).to(u_ptr.dtype.element_ty)
    if DORA:
        # PEFT's form, exact at init: y = base + ((c − 1)·P + c·s·u·Bᵀ) with base = x·Wᵀ + b and
        # P = xd·Wᵀ (dropout) or x·Wᵀ, evaluated as y = (base + s·u·Bᵀ) + (c − 1)·h with
        # h = P + s·u·Bᵀ: two fp32 tiles live, and c == 1, B == 0 give y == base bit for bit.
        c = tl.load(c_ptr + offs_n, mask=n_in, other=0.0)[None, :]
        if BASE_GEMM:
            plain = acc
            base = acc
            if HAS_BIAS:
                base += bias
        else:
            base = acc  # cuBLAS's x·Wᵀ + b; HAS_BIAS: subtract b to get x·Wᵀ
            plain = acc
            if HAS_BIAS:
                plain = acc - bias
        if DORA_DROPOUT:
            plain = acc_dropped
        h = mma(u_s, b_t, plain, DOT_FP32, INPUT_PRECISION)
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=tile_in)
        out = mma(u_s, b_t, base, DOT_FP32, INPUT_PRECISION) + (c - 1.0) * h
    else:
        out = mma(u_s, b_t, acc, DOT_FP32, INPUT_PRECISION)
        if HAS_BIAS:
            out += bias
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=tile_in)


_lora_linear_fwd_tuned = triton.autotune(
    configs=configs.autotune_configs("linear_fwd"),
    key=["KEY_TOKENS", "N", "K", "R", "BASE_GEMM", "HAS_BIAS", "DORA", "DORA_DROPOUT", "QUANT", "NESTED"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("linear_fwd")},
    # the hybrid path accumulates into y (and h): tuning runs must not compound
    restore_value=["y_ptr", "h_ptr"],
)(_lora_linear_fwd_kernel)


def lora_linear_fwd(x, weight, bias, u, lora_b, scale: float, y=None, dora_scale=None, h=None, x_dropped=None):
    """The forward GEMM + epilogue. x: M×K, weight: N×K, bias: N or None, u: M×r, lora_b: N×r; any strides.

    ``weight`` may be a :class:`lora_kernels.quant.QuantizedWeight` on the fused path (y is None):
    its tiles are decoded to x's dtype inside the K loop (no N×K tensor is written).

    Fused (y is None): computes x·Wᵀ itself. Hybrid (y given, holding x·Wᵀ, plus b for LoRA):
    finishes y in place. ``bias``: fused, added by the kernel; hybrid, y already holds it (LoRA
    passes None; DoRA passes it so the kernel can recover x·Wᵀ = y − b). DoRA: ``dora_scale`` c
    (N, fp32) and ``h`` (M×N, written;
    for the hybrid path with dropout it must hold xd·Wᵀ on entry); ``x_dropped`` (x ⊙ Z, M×K)
    selects the dropout formula (fused path: used as a GEMM operand).
    """
    M, K = x.shape
    N, R = lora_b.shape
    base_gemm = y is None
    dora = dora_scale is not None
    dora_dropout = dora and x_dropped is not None
    w, stride_wn, stride_wk, quant_ptrs, quant_flags = weight_operands(weight, x.dtype, x)
    if quant_flags["QUANT"] and not base_gemm:
        raise ValueError("a 4-bit weight is decoded inside the fused GEMM only (y must be None)")
    if base_gemm:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    xd = x_dropped if dora_dropout else x
    args = (
        x, xd, w, bias if bias is not None else x, u, lora_b,
        dora_scale if dora else x, y, h if dora else y, *quant_ptrs,
        M, N, K, R,
        x.stride(0), x.stride(1), xd.stride(0), xd.stride(1), stride_wn, stride_wk,
        u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        (h if dora else y).stride(0), (h if dora else y).stride(1),
        float(scale), configs.m_bucket(M),
    )
    flags = dict(
        BASE_GEMM=base_gemm, HAS_BIAS=bias is not None, DORA=dora, DORA_DROPOUT=dora_dropout,
        DOT_FP32=configs.dot_fp32(), INPUT_PRECISION=configs.input_precision(x.dtype),
        BLOCK_R=configs.block_rank(R), **quant_flags,
    )
    if configs.use_fixed_config():
        meta = configs.fixed_config("linear_fwd", flags["BLOCK_R"], x.element_size(), flags)
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _lora_linear_fwd_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _lora_linear_fwd_tuned[grid](*args, **flags)
    return y

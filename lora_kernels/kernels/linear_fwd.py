"""Forward GEMM with the LoRA expand in its epilogue: ``_lora_linear_fwd_kernel`` and its launcher.

    y = x·Wᵀ + b + s·u·Bᵀ        (u = (x ⊙ Z)·Aᵀ from :mod:`.shrink`)

BASE_GEMM=True is the fused path: the kernel computes x·Wᵀ itself and writes y once.
BASE_GEMM=False is the hybrid path: y already holds cuBLAS's x·Wᵀ + b and the kernel adds
s·u·Bᵀ into it in place (one read and one write of y).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import mma


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
    stride_bn, stride_br, stride_ym, stride_yn,
    scale,
    M_BUCKET,  # autotune key only
    BASE_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x: M×K, w: N×K, bias: N, u: M×R, b (lora_b): N×R, y: M×N (input too when not BASE_GEMM)."""
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
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn

    if BASE_GEMM:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_in = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=k_in[:, None] & n_in[None, :], other=0.0)
            acc = mma(x, w, acc, DOT_FP32, INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(y_ptrs, mask=m_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)

    # Expand epilogue: + s·u_tile·B_tileᵀ (rank padded to BLOCK_R with zeros).
    r_in = offs_r < R
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=r_in[:, None] & n_in[None, :], other=0.0)
    lora = mma(u, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
    acc += lora * scale  # scale arrives as an fp32 scalar
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


_lora_linear_fwd_tuned = triton.autotune(
    configs=configs.autotune_configs("linear_fwd"),
    key=["M_BUCKET", "N", "K", "R", "BASE_GEMM", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("linear_fwd")},
    restore_value=["y_ptr"],  # the hybrid path accumulates into y: tuning runs must not compound
)(_lora_linear_fwd_kernel)


def lora_linear_fwd(x, weight, bias, u, lora_b, scale: float, y=None) -> torch.Tensor:
    """Fused (y is None): y = x·Wᵀ + b + s·u·Bᵀ. Hybrid (y given, = x·Wᵀ + b): y += s·u·Bᵀ in place.

    x: M×K, weight: N×K, bias: N or None, u: M×r, lora_b: N×r; any strides.
    """
    M, K = x.shape
    N, R = lora_b.shape
    base_gemm = y is None
    if base_gemm:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    has_bias = base_gemm and bias is not None
    args = (
        x, weight, bias if has_bias else x, u, lora_b, y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        float(scale), configs.m_bucket(M),
    )
    flags = dict(
        BASE_GEMM=base_gemm, HAS_BIAS=has_bias, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(x.dtype), BLOCK_R=configs.block_rank(R),
    )
    if configs.use_fixed_config():
        meta = configs.fixed_config("linear_fwd", flags["BLOCK_R"], x.element_size())
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _lora_linear_fwd_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _lora_linear_fwd_tuned[grid](*args, **flags)
    return y

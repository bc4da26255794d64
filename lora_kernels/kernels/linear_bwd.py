"""Backward dx GEMM with the mask-aware LoRA epilogue and dA: ``_lora_linear_bwd_kernel``.

    LoRA:            dx = g·W + s·(v·A) ⊙ Z                        dA = s·vᵀ·(x ⊙ Z),  v = g·B
    DoRA, no drop:   dx = gc·W + s·(v·A)                            v = gc·B, gc = g ⊙ c
    DoRA, dropout:   dx = g·W + Z ⊙ (gc·W − g·W + s·v·A)           (= g·W + Z ⊙ ((g⊙(c−1))·W + s·v·A))

Each program owns one K-column block of dx and dA and walks a fixed range of M row blocks (axis 1
splits M into a few ranges). Per row block it builds the dx tile (BASE_GEMM: g·W in the kernel,
the fused path; otherwise: reads cuBLAS's g·W from dx, the hybrid path), regenerates Z for that
tile, adds s·(v·A)⊙Z and accumulates vᵀ·(x⊙Z) into a dA accumulator held in registers. Each split
writes one fp32 dA partial; the partials are summed in a fixed order, so dA is deterministic and
no atomics are used. A (r×BLOCK_K) is loaded once per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_multiplier, mma


@triton.jit
def _lora_linear_bwd_kernel(
    g_ptr, w_ptr, v_ptr, a_ptr, x_ptr, c_ptr, aux_ptr, dx_ptr, da_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_vm, stride_vr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_auxm, stride_auxk, stride_dxm, stride_dxk, stride_das, stride_dar, stride_dak,
    seed, dropout_p, keep_scale, scale, rows_per_split,
    M_BUCKET,  # autotune key only
    BASE_GEMM: tl.constexpr, COMPUTE_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DORA: tl.constexpr, DORA_DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g: M×N, w: N×K, v: M×R, a: R×K, x: M×K, c: N (fp32, DoRA), dx: M×K, da: S×R×K fp32
    partials (S = number of M splits, program axis 1).

    When not BASE_GEMM, dx holds cuBLAS's g·W (DoRA: gc·W) on entry and, for DoRA with dropout,
    aux (M×K) holds g·W."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_in = offs_k < K
    r_in = offs_r < R
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_in[:, None] & k_in[None, :], other=0.0)
    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)

    # rows_per_split is a multiple of every BLOCK_M in the configs, so splits tile M exactly.
    first_block = pid_s * (rows_per_split // BLOCK_M)
    last_block = tl.minimum(first_block + rows_per_split // BLOCK_M, tl.cdiv(M, BLOCK_M))
    for mb in range(first_block, last_block):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        m_in = offs_m < M
        tile_in = m_in[:, None] & k_in[None, :]
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=m_in[:, None] & r_in[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=tile_in, other=0.0)
        if HAS_DROPOUT:
            z = dropout_multiplier(seed, offs_m[:, None] * K + offs_k[None, :], dropout_p, keep_scale)
            x = (x * z).to(x_ptr.dtype.element_ty)
        da = mma(tl.trans(v), x, da, DOT_FP32, INPUT_PRECISION)

        if COMPUTE_DX:
            dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
            acc_plain = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # g·W (DoRA with dropout only)
            if BASE_GEMM:
                acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # g·W (DoRA: gc·W)
                for n0 in range(0, N, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                    n_in = offs_n < N
                    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                                mask=m_in[:, None] & n_in[None, :], other=0.0)
                    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                                mask=n_in[:, None] & k_in[None, :], other=0.0)
                    if DORA:
                        c = tl.load(c_ptr + offs_n, mask=n_in, other=0.0)
                        gc = (g * c[None, :]).to(g_ptr.dtype.element_ty)
                        acc = mma(gc, w, acc, DOT_FP32, INPUT_PRECISION)
                        if DORA_DROPOUT:
                            acc_plain = mma(g, w, acc_plain, DOT_FP32, INPUT_PRECISION)
                    else:
                        acc = mma(g, w, acc, DOT_FP32, INPUT_PRECISION)
            else:
                acc = tl.load(dx_ptrs, mask=tile_in, other=0.0).to(tl.float32)
                if DORA_DROPOUT:
                    acc_plain = tl.load(aux_ptr + offs_m[:, None] * stride_auxm + offs_k[None, :] * stride_auxk,
                                        mask=tile_in, other=0.0).to(tl.float32)
            va = mma(v, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
            va = va * scale
            if DORA_DROPOUT:
                acc = acc_plain + z * (acc - acc_plain + va)
            else:
                if HAS_DROPOUT:
                    va = va * z
                acc += va
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile_in)

    da_ptrs = da_ptr + pid_s.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    tl.store(da_ptrs, da, mask=r_in[:, None] & k_in[None, :])


_lora_linear_bwd_tuned = triton.autotune(
    configs=configs.autotune_configs("linear_bwd"),
    key=["M_BUCKET", "N", "K", "R", "BASE_GEMM", "COMPUTE_DX", "HAS_DROPOUT", "DORA", "DORA_DROPOUT"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("linear_bwd")},
    restore_value=["dx_ptr"],  # the hybrid path accumulates into dx
)(_lora_linear_bwd_kernel)


_MAX_BLOCK_M = 128  # the largest BLOCK_M in configs.py; split boundaries are multiples of it


def _split_m(M: int, k_blocks: int, device) -> tuple[int, int]:
    """(splits, rows per split): enough programs to fill the GPU, few fp32 dA partials."""
    splits = max(1, min(triton.cdiv(M, _MAX_BLOCK_M), triton.cdiv(configs.target_programs(device), k_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), _MAX_BLOCK_M) * _MAX_BLOCK_M
    return triton.cdiv(M, rows_per_split), rows_per_split


def lora_linear_bwd(grad_y, weight, v, lora_a, x, scale: float, seed: int, dropout_p: float,
                    dx=None, compute_dx: bool = True, dora_scale=None, aux=None):
    """dx and dA of DESIGN.md §2/§3 from g (M×N), W (N×K), v (M×r), A (r×K), x (M×K).

    Fused: dx is None and compute_dx -> dx is allocated and g·W computed in the kernel.
    Hybrid: dx given (holding g·W from cuBLAS; DoRA: gc·W) -> the LoRA term is added in place.
    compute_dx=False -> only dA. DoRA: ``dora_scale`` c (N, fp32; v must be gc·B); with dropout
    the hybrid path also passes ``aux`` = g·W. Returns (dx or None, dA) with dA in x's dtype.
    """
    M, K = x.shape
    N = grad_y.shape[1]
    R = lora_a.shape[0]
    base_gemm = compute_dx and dx is None
    dora = dora_scale is not None
    dora_dropout = dora and dropout_p > 0.0
    if base_gemm:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, torch.zeros((R, K), dtype=x.dtype, device=x.device)
    dx_arg = dx if compute_dx else x  # never written when COMPUTE_DX is False
    aux_arg = aux if (dora_dropout and not base_gemm and compute_dx) else x
    flags = dict(
        BASE_GEMM=base_gemm, COMPUTE_DX=compute_dx, HAS_DROPOUT=dropout_p > 0.0, DORA=dora,
        DORA_DROPOUT=dora_dropout, DOT_FP32=configs.dot_fp32(), INPUT_PRECISION=configs.input_precision(x.dtype),
        BLOCK_R=configs.block_rank(R),
    )

    def args(block_k):
        splits, rows_per_split = _split_m(M, triton.cdiv(K, block_k), x.device)
        partial = torch.empty((splits, R, K), dtype=torch.float32, device=x.device)
        return partial, splits, (
            grad_y, weight, v, lora_a, x, dora_scale if dora else x, aux_arg, dx_arg, partial,
            M, N, K, R,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            v.stride(0), v.stride(1), lora_a.stride(0), lora_a.stride(1),
            x.stride(0), x.stride(1), aux_arg.stride(0), aux_arg.stride(1), dx_arg.stride(0), dx_arg.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            seed, float(dropout_p), 1.0 / (1.0 - dropout_p), float(scale), rows_per_split,
            configs.m_bucket(M),
        )

    if configs.use_fixed_config():
        meta = configs.fixed_config("linear_bwd", flags["BLOCK_R"], x.element_size())
        partial, splits, a = args(meta["BLOCK_K"])
        _lora_linear_bwd_kernel[(triton.cdiv(K, meta["BLOCK_K"]), splits)](*a, **flags, **meta)
    else:
        partial, splits, a = args(64)
        grid = lambda META: (triton.cdiv(K, META["BLOCK_K"]), splits)  # noqa: E731
        _lora_linear_bwd_tuned[grid](*a, **flags)
    return (dx if compute_dx else None), (partial.sum(0) * scale).to(x.dtype)

"""DoRA's two extra kernels and their launchers.

``_dora_weight_norm_kernel``: n_j = max(‖W_j + s·(B·A)_j‖₂, eps), streamed: each program owns a
block of rows, walks K, forms W_tile + s·B_tile·A_tile in registers (fp32) and accumulates its
squares. W + s·B·A never exists in memory (lora_kernels/dora.py explains streaming vs the identity).

``_dora_magnitude_grad_kernel``: dm_j = Σ_rows g_ij · h_ij / n_j (h = xd·Wᵀ + s·u·Bᵀ saved by the
forward, n detached). A column reduction over tokens: programs own a block of columns and a fixed
range of rows and write fp32 partials that are summed in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import DORA_EPS
from . import configs
from .dequant import load_w4, weight_operands
from .dropout import mma


@triton.jit
def _dora_weight_norm_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr = False, W_KIND: tl.constexpr = 0, QBLOCK: tl.constexpr = 1, QBLOCK2: tl.constexpr = 1,
    NESTED: tl.constexpr = False, IDX64: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    """w: N×K, a (lora_a): R×K, b (lora_b): N×R, out: N fp32 (squared norms).

    QUANT: w_ptr is a 4-bit weight's packed bytes (flat N×K), each tile decoded by
    :func:`.dequant.load_w4` into W_KIND (the adapters' dtype), as the dense path would read it."""
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_in = offs_n < N
    r_in = offs_r < R
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_in[:, None] & r_in[None, :], other=0.0)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = offs_k < K
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_in[:, None] & k_in[None, :], other=0.0)
        if QUANT:
            w = load_w4(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
                        QBLOCK, QBLOCK2, NESTED, W_KIND, IDX64, BLOCK_N, BLOCK_K, INTERPRET)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=n_in[:, None] & k_in[None, :], other=0.0)
        ba = mma(b, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
        t = w.to(tl.float32) + ba * scale
        sq += tl.sum(t * t, axis=1)
    tl.store(out_ptr + offs_n, sq, mask=n_in)


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                     eps: float = DORA_EPS) -> torch.Tensor:
    """n (N, fp32) = max(‖W_j + s·(B·A)_j‖₂, eps), one streamed pass over W (a dense N×K tensor, or a
    :class:`lora_kernels.quant.QuantizedWeight` decoded tile by tile into lora_a's dtype)."""
    N, K = weight.shape
    R = lora_a.shape[0]
    sq = torch.empty(N, dtype=torch.float32, device=weight.device)
    if N == 0:
        return sq
    block_r = configs.block_rank(R)
    meta = configs.fixed_config("dora_norm")
    if block_r >= 128 and not configs.is_interpreter():  # keep the B tile and B·A in registers
        meta = dict(meta, BLOCK_N=32, num_warps=8)
    w, stride_wn, stride_wk, quant_ptrs, quant_flags = weight_operands(weight, lora_a.dtype, lora_a)
    if quant_flags["QUANT"] and not configs.is_interpreter():
        # the decoded tile holds more registers than a loaded one: 64×128 / 4 warps spilled on sm_90a;
        # 32×64 / 8 warps compiled without spills for bf16 at ranks 16-128 and fp32 at 16 and 64 (fp32
        # at rank 128 spilled in every candidate tried, least 8.5 KB) (issue 17, compile-only)
        meta = dict(meta, BLOCK_N=32, BLOCK_K=64, num_warps=8)
    _dora_weight_norm_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
        w, lora_a, lora_b, sq, *quant_ptrs, N, K, R,
        stride_wn, stride_wk, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        float(scale),
        DOT_FP32=configs.dot_fp32(), INPUT_PRECISION=configs.input_precision(lora_a.dtype), BLOCK_R=block_r,
        **meta, **quant_flags,
    )
    return sq.sqrt_().clamp_min_(eps)


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
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # A plain trip count (an argument) and bounds by mask: no range() over a tensor bound
    # (the triton 3.6 interpreter fails on those with numpy >= 2.4). Splits are whole BLOCK_Ms.
    for dm in range(0, rows_per_split, BLOCK_M):
        offs_m = row_start + dm + tl.arange(0, BLOCK_M).to(tl.int64)
        inside = (offs_m < M)[:, None] & n_in[None, :]
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

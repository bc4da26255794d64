"""Thin GEMMs down to the adapter rank: ``_lora_shrink_kernel`` and its launchers.

One kernel computes ``out[s] = Σ_{q in split s} (inp[p, q] ⊙ Z[p, q]) · mat[q, r]`` for a tall
P×Q input and a Q×R matrix (R ≤ 256, padded to a power of two inside the kernel only). Strides
make the same kernel serve three products of DESIGN.md §2:

- ``lora_shrink_fwd``: u = (x ⊙ Z)·Aᵀ   (inp = x, mat = Aᵀ, Z generated in registers)
- ``lora_shrink_bwd``: v = g·B          (inp = g, mat = B)
- ``lora_b_grad_bwd``: dB = s·gᵀ·u      (inp = gᵀ, mat = u; split over tokens into fp32 partials,
  summed in a fixed order afterwards, so the result is deterministic)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_multiplier, mma


@triton.jit
def _lora_shrink_kernel(
    inp_ptr, mat_ptr, out_ptr, dropped_ptr,
    P, Q, R,
    stride_ip, stride_iq, stride_mq, stride_mr, stride_os, stride_op, stride_or, stride_dp, stride_dq,
    seed, dropout_p, keep_scale, mask_row_len, q_per_split,
    P_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """inp: P×Q, mat: Q×R, out: S×P×R (S = number of splits over Q, program axis 1).

    With HAS_DROPOUT, inp[p, q] is multiplied by Z at flat index p·mask_row_len + q; with
    STORE_DROPPED that product is also written to dropped (P×Q) — DoRA's dropout term needs it as a
    GEMM operand (a transient, never saved for backward).
    """
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    q_start = pid_s.to(tl.int64) * q_per_split
    q_end = tl.minimum(q_start + q_per_split, Q)
    p_in = offs_p < P
    r_in = offs_r < R

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
        q_in = offs_q < q_end
        a = tl.load(
            inp_ptr + offs_p[:, None] * stride_ip + offs_q[None, :] * stride_iq,
            mask=p_in[:, None] & q_in[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            z = dropout_multiplier(seed, offs_p[:, None] * mask_row_len + offs_q[None, :], dropout_p, keep_scale)
            a = (a * z).to(inp_ptr.dtype.element_ty)
            if STORE_DROPPED:
                tl.store(dropped_ptr + offs_p[:, None] * stride_dp + offs_q[None, :] * stride_dq, a,
                         mask=p_in[:, None] & q_in[None, :])
        b = tl.load(
            mat_ptr + offs_q[:, None] * stride_mq + offs_r[None, :] * stride_mr,
            mask=q_in[:, None] & r_in[None, :], other=0.0,
        )
        acc = mma(a, b, acc, DOT_FP32, INPUT_PRECISION)

    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_in[:, None] & r_in[None, :])


_lora_shrink_tuned = triton.autotune(
    configs=configs.autotune_configs("shrink"),
    key=["P_BUCKET", "Q", "R", "HAS_DROPOUT", "STORE_DROPPED"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("shrink")},
)(_lora_shrink_kernel)


def _launch_shrink(inp, mat, out, *, splits, q_per_split, seed=0, dropout_p=0.0, mask_row_len=0, dropped=None):
    """Launch over inp (P×Q), mat (Q×R) into out (splits×P×R). Strides are passed, nothing is copied."""
    P, Q = inp.shape
    R = mat.shape[1]
    has_dropout = dropout_p > 0.0
    store_dropped = has_dropout and dropped is not None
    dropped_arg = dropped if store_dropped else inp
    args = (
        inp, mat, out, dropped_arg, P, Q, R,
        inp.stride(0), inp.stride(1), mat.stride(0), mat.stride(1),
        out.stride(0), out.stride(1), out.stride(2), dropped_arg.stride(0), dropped_arg.stride(1),
        seed, float(dropout_p), 1.0 / (1.0 - dropout_p), mask_row_len, q_per_split,
        configs.m_bucket(P),
    )
    flags = dict(
        HAS_DROPOUT=has_dropout, STORE_DROPPED=store_dropped, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(inp.dtype), BLOCK_R=configs.block_rank(R),
    )
    if configs.use_fixed_config():
        meta = configs.fixed_config("shrink", flags["BLOCK_R"], inp.element_size())
        _lora_shrink_kernel[(triton.cdiv(P, meta["BLOCK_P"]), splits)](*args, **flags, **meta)
    else:
        grid = lambda META: (triton.cdiv(P, META["BLOCK_P"]), splits)  # noqa: E731
        _lora_shrink_tuned[grid](*args, **flags)


def lora_shrink_fwd(x: torch.Tensor, lora_a: torch.Tensor, seed: int, dropout_p: float,
                    dropped: torch.Tensor | None = None) -> torch.Tensor:
    """u = (x ⊙ Z)·Aᵀ for x (M×K, any strides) and A (r×K). Returns u (M×r) in x's dtype.

    If ``dropped`` (M×K) is given and p > 0, x ⊙ Z is also written there.
    """
    M, K = x.shape
    u = torch.empty((M, lora_a.shape[0]), dtype=x.dtype, device=x.device)
    _launch_shrink(x, lora_a.t(), u.unsqueeze(0), splits=1, q_per_split=K,
                   seed=seed, dropout_p=dropout_p, mask_row_len=K, dropped=dropped)
    return u


def lora_shrink_bwd(grad_y: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """v = g·B for g (M×N) and B (N×r). Returns v (M×r) in g's dtype."""
    M, N = grad_y.shape
    v = torch.empty((M, lora_b.shape[1]), dtype=grad_y.dtype, device=grad_y.device)
    _launch_shrink(grad_y, lora_b, v.unsqueeze(0), splits=1, q_per_split=N)
    return v


def lora_b_grad_bwd(grad_y: torch.Tensor, u: torch.Tensor, scale: float,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """dB = s·gᵀ·u (N×r), reduced over tokens in a fixed number of fp32 partials (deterministic).

    ``row_scale`` (N, fp32) multiplies row j of dB (DoRA: dB = c ⊙ s·gᵀ·u) before the final cast.
    """
    M, N = grad_y.shape
    R = u.shape[1]
    if M == 0:
        return torch.zeros((N, R), dtype=grad_y.dtype, device=grad_y.device)
    # Split boundaries fall on whole BLOCK_Q steps of every config (the largest BLOCK_Q is 256).
    unit = configs.fixed_config("shrink")["BLOCK_Q"] if configs.use_fixed_config() else 256
    p_blocks = triton.cdiv(N, 64)
    splits = max(1, min(triton.cdiv(M, unit), configs.target_programs(grad_y.device) // p_blocks))
    q_per_split = triton.cdiv(triton.cdiv(M, splits), unit) * unit
    splits = triton.cdiv(M, q_per_split)
    partial = torch.empty((splits, N, R), dtype=torch.float32, device=grad_y.device)
    _launch_shrink(grad_y.t(), u, partial, splits=splits, q_per_split=q_per_split)
    grad_b = partial.sum(0) * scale
    if row_scale is not None:
        grad_b *= row_scale[:, None]
    return grad_b.to(grad_y.dtype)

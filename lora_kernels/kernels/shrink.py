"""Thin GEMMs down to the adapter rank: ``_lora_shrink_kernel`` and its launchers.

One kernel computes ``out[p, r] = out_scale · row_scale[p] · Σ_q keep[p, q]·inp[p, q]·mat[q, r]``
for a tall P×Q input and a Q×R matrix (R ≤ 256, padded to a power of two inside the kernel only),
each program owning BLOCK_P rows and walking all of Q (no partial sums, no finishing launch).
Strides make the same code serve three products of DESIGN.md §2:

- ``lora_shrink_fwd``: u = (x ⊙ Z)·Aᵀ   (inp = x, mat = Aᵀ, keep bits made in registers,
  out_scale = the keep-scale 1/(1 − p_eff))
- ``lora_shrink_bwd``: v = g·B and dB = s·gᵀ·u in ONE launch (``lora_grad_shrink_bwd``): the first
  programs compute v row blocks, the others dB row blocks (inp = gᵀ, mat = u, out_scale = s,
  DoRA's row scale c). Each dB row block is reduced over all tokens by one program in a fixed
  order, so dB is deterministic without atomics or partial buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import GROUP, dropout_threshold, keep_scale, seed_halves
from . import configs
from .dropout import apply_keep, keep_tile, mma


@triton.jit
def _shrink_step(
    acc, inp_ptr, mat_ptr, dropped_ptr, offs_p, p_in, offs_r, r_in, q0, Q,
    stride_ip, stride_iq, stride_mq, stride_mr, stride_dp, stride_dq,
    seed_lo, seed_hi, threshold, dropped_scale, k_groups,
    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """acc + (keep ⊙ inp[rows, q0:q0+BLOCK_Q])·mat[q0:q0+BLOCK_Q, :] (one step of the Q loop)."""
    offs_q = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
    q_in = offs_q < Q
    a = tl.load(inp_ptr + offs_p[:, None] * stride_ip + offs_q[None, :] * stride_iq,
                mask=p_in[:, None] & q_in[None, :], other=0.0)
    if HAS_DROPOUT:
        keep = keep_tile(seed_lo, seed_hi, threshold, offs_p, q0, k_groups, BLOCK_P, BLOCK_Q)
        a = apply_keep(a, keep, DOT_FP32)
        if STORE_DROPPED:
            tl.store(dropped_ptr + offs_p[:, None] * stride_dp + offs_q[None, :] * stride_dq,
                     (a.to(tl.float32) * dropped_scale).to(dropped_ptr.dtype.element_ty),
                     mask=p_in[:, None] & q_in[None, :])
    b = tl.load(mat_ptr + offs_q[:, None] * stride_mq + offs_r[None, :] * stride_mr,
                mask=q_in[:, None] & r_in[None, :], other=0.0)
    return mma(a, b, acc, DOT_FP32, INPUT_PRECISION)


@triton.jit
def _shrink_store(acc, out_ptr, row_scale_ptr, offs_p, p_in, offs_r, r_in, stride_op, stride_or, out_scale,
                  ROW_SCALE: tl.constexpr):
    acc = acc * out_scale
    if ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + offs_p, mask=p_in, other=0.0)[:, None]
    tl.store(out_ptr + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=p_in[:, None] & r_in[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lora_shrink_kernel(
    inp_ptr, mat_ptr, out_ptr, dropped_ptr, inp2_ptr, mat2_ptr, out2_ptr, row_scale2_ptr,
    P, Q, R, P2, Q2,
    stride_ip, stride_iq, stride_mq, stride_mr, stride_op, stride_or, stride_dp, stride_dq,
    stride_i2p, stride_i2q, stride_m2q, stride_m2r, stride_o2p, stride_o2r,
    seed_lo, seed_hi, threshold, out_scale, dropped_scale, k_groups, out_scale2,
    KEY_TOKENS, KEY_FEATURES,  # autotune keys only (tokens bucketed to a power of two)
    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr, SECOND: tl.constexpr, ROW_SCALE2: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """inp: P×Q, mat: Q×R, out: P×R; with SECOND, also inp2: P2×Q2, mat2: Q2×R, out2: P2×R,
    row_scale2: P2 (fp32), computed by the programs after the cdiv(P, BLOCK_P) of product 1.

    Product 1 may drop out (keep bit of element (p, q) of a P×Q input, k_groups = ceil(Q/16));
    with STORE_DROPPED, x ⊙ Z = keep·inp·dropped_scale is also written to dropped (P×Q) — DoRA's
    dropout term needs it as a GEMM operand (a transient, never saved for backward). Each output
    row block is reduced over all of Q by one program. The loops run over kernel arguments (Q, Q2),
    never over a bound computed in the kernel (the triton 3.6 interpreter fails on those).
    """
    pid = tl.program_id(0)
    first_programs = tl.cdiv(P, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    if pid < first_programs:
        offs_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = offs_p < P
        acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            acc = _shrink_step(acc, inp_ptr, mat_ptr, dropped_ptr, offs_p, p_in, offs_r, r_in, q0, Q,
                               stride_ip, stride_iq, stride_mq, stride_mr, stride_dp, stride_dq,
                               seed_lo, seed_hi, threshold, dropped_scale, k_groups,
                               HAS_DROPOUT, STORE_DROPPED, DOT_FP32, INPUT_PRECISION, BLOCK_P, BLOCK_Q)
        _shrink_store(acc, out_ptr, out_ptr, offs_p, p_in, offs_r, r_in, stride_op, stride_or, out_scale, False)
    elif SECOND:
        offs_p = (pid - first_programs).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = offs_p < P2
        acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        for q0 in range(0, Q2, BLOCK_Q):
            acc = _shrink_step(acc, inp2_ptr, mat2_ptr, out2_ptr, offs_p, p_in, offs_r, r_in, q0, Q2,
                               stride_i2p, stride_i2q, stride_m2q, stride_m2r, 0, 0,
                               seed_lo, seed_hi, threshold, 1.0, k_groups,
                               False, False, DOT_FP32, INPUT_PRECISION, BLOCK_P, BLOCK_Q)
        _shrink_store(acc, out2_ptr, row_scale2_ptr, offs_p, p_in, offs_r, r_in, stride_o2p, stride_o2r,
                      out_scale2, ROW_SCALE2)


_lora_shrink_tuned = triton.autotune(
    configs=configs.autotune_configs("shrink"),
    key=["KEY_TOKENS", "KEY_FEATURES", "R", "HAS_DROPOUT", "STORE_DROPPED", "SECOND", "ROW_SCALE2"],
    prune_configs_by={"early_config_prune": configs.prune_by_rank("shrink")},
)(_lora_shrink_kernel)


def _launch_shrink(inp, mat, out, *, tokens, features, seed=0, dropout_p=0.0, dropped=None,
                   second=None, out_scale2=1.0, row_scale2=None):
    """out = inp·mat (P×Q times Q×R, with dropout on inp when dropout_p > 0) and, if ``second`` =
    (inp2, mat2, out2) is given, out2 = out_scale2·row_scale2 ⊙ inp2·mat2 in the same launch."""
    P, Q = inp.shape
    R = mat.shape[1]
    has_dropout = dropout_p > 0.0
    store_dropped = has_dropout and dropped is not None
    dropped_arg = dropped if store_dropped else inp
    inp2, mat2, out2 = second if second is not None else (inp, mat, out)
    seed_lo, seed_hi = seed_halves(seed)
    scale = keep_scale(dropout_p) if has_dropout else 1.0
    args = (
        inp, mat, out, dropped_arg, inp2, mat2, out2, row_scale2 if row_scale2 is not None else mat,
        P, Q, R, inp2.shape[0], inp2.shape[1],
        inp.stride(0), inp.stride(1), mat.stride(0), mat.stride(1), out.stride(0), out.stride(1),
        dropped_arg.stride(0), dropped_arg.stride(1),
        inp2.stride(0), inp2.stride(1), mat2.stride(0), mat2.stride(1), out2.stride(0), out2.stride(1),
        seed_lo, seed_hi, dropout_threshold(dropout_p), scale, scale, triton.cdiv(Q, GROUP), float(out_scale2),
        configs.m_bucket(tokens), features,
    )
    flags = dict(
        HAS_DROPOUT=has_dropout, STORE_DROPPED=store_dropped, SECOND=second is not None,
        ROW_SCALE2=row_scale2 is not None, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(inp.dtype), BLOCK_R=configs.block_rank(R),
    )
    p2 = inp2.shape[0] if second is not None else 0
    if configs.use_fixed_config():
        meta = configs.fixed_config("shrink", flags["BLOCK_R"], inp.element_size(), flags)
        bp = meta["BLOCK_P"]
        _lora_shrink_kernel[(triton.cdiv(P, bp) + triton.cdiv(p2, bp),)](*args, **flags, **meta)
    else:
        grid = lambda META: (triton.cdiv(P, META["BLOCK_P"]) + triton.cdiv(p2, META["BLOCK_P"]),)  # noqa: E731
        _lora_shrink_tuned[grid](*args, **flags)


def lora_shrink_fwd(x: torch.Tensor, lora_a: torch.Tensor, seed: int, dropout_p: float,
                    dropped: torch.Tensor | None = None) -> torch.Tensor:
    """u = (x ⊙ Z)·Aᵀ for x (M×K, any strides) and A (r×K). Returns u (M×r) in x's dtype.

    If ``dropped`` (M×K) is given and p > 0, x ⊙ Z is also written there.
    """
    M, K = x.shape
    u = torch.empty((M, lora_a.shape[0]), dtype=x.dtype, device=x.device)
    if M == 0:
        return u
    _launch_shrink(x, lora_a.t(), u, tokens=M, features=K, seed=seed, dropout_p=dropout_p, dropped=dropped)
    return u


def lora_grad_shrink_bwd(grad_y: torch.Tensor, lora_b: torch.Tensor, u: torch.Tensor, scale: float,
                         row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, dB) in one launch: v = g·B (M×r) and dB = s·gᵀ·u (N×r), both in g's dtype.

    ``row_scale`` (N, fp32) multiplies row j of dB (DoRA: dB = c ⊙ s·gᵀ·u) before the cast.
    """
    M, N = grad_y.shape
    R = lora_b.shape[1]
    v = torch.empty((M, R), dtype=grad_y.dtype, device=grad_y.device)
    if M == 0:
        return v, torch.zeros((N, R), dtype=grad_y.dtype, device=grad_y.device)
    grad_b = torch.empty((N, R), dtype=grad_y.dtype, device=grad_y.device)
    _launch_shrink(grad_y, lora_b, v, tokens=M, features=N, second=(grad_y.t(), u, grad_b),
                   out_scale2=scale, row_scale2=row_scale)
    return v, grad_b


def lora_shrink_bwd(grad_y: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """v = g·B for g (M×N) and B (N×r). Returns v (M×r) in g's dtype."""
    M, N = grad_y.shape
    v = torch.empty((M, lora_b.shape[1]), dtype=grad_y.dtype, device=grad_y.device)
    if M == 0:
        return v
    _launch_shrink(grad_y, lora_b, v, tokens=M, features=N)
    return v

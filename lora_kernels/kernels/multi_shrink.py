"""Segmented gather-shrink for many adapters in one launch (SGMV-style): ``_lora_multi_shrink_kernel``.

Rows of the flattened input x (M×K) are grouped (see :mod:`lora_kernels.multi.plan`): group g owns
the positions ``[group_start[g], group_end[g])`` of a row list ``rows`` (original row numbers, so x
is gathered, never permuted in memory), and ``S`` adapter slots ``group_slots[g, :]`` (−1 = empty).
A mixed batch has one group per adapter and one slot; several active adapters are one group holding
every row, with one slot per active adapter.

Program (b, s) takes the BLOCK_M positions of row block b (a table ``blk_group`` / ``blk_start``
cut so that a block never straddles two groups) and computes, for adapter a = group_slots[g, s],

    u[s, pos, :R_a] = (x[rows[pos], :] ⊙ Z_a[rows[pos], :]) · A[a, :R_a, :]ᵀ

with Z_a the adapter's dropout mask regenerated from its own seed for element (rows[pos], k) of the
M×K input (:mod:`lora_kernels.dropout`: one Philox call per 16 consecutive elements of a row, 8-bit
thresholds), so it is the same mask as a single-adapter call on the whole batch, bit for bit. The
keep bits multiply x (a product: NaN propagates) and the adapter's keep-scale 1/(1 − p_eff) scales
the fp32 accumulator once. Each adapter's seed arrives as its two int32 words in a device tensor
(n×2, indexed by adapter), so no seed is a kernel argument and a new seed never recompiles. A is stacked [n_adapters, r_max, K]
(zero padded; rank R_a masked anyway). Blocks past the table's end (marked −1) exit at once, so the
grid can be sized from M and the number of groups without reading anything back from the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ..dropout import GROUP
from .dropout import apply_keep, keep_tile, mma


@triton.jit
def _lora_multi_shrink_kernel(
    x_ptr, a_ptr, u_ptr, rows_ptr, blk_group_ptr, blk_start_ptr, group_end_ptr, group_slots_ptr,
    rank_ptr, seed_ptr, thr_ptr, keep_ptr,
    K, S, R_MAX,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_us, stride_up, stride_ur, stride_gs,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: M×K (any strides); a: n_adapters×r_max×K; u: S×P×r_max (P = len(rows)); rows: P int64;
    blk_group / blk_start: T int32; group_end: G int32; group_slots: G×S int32;
    rank: n_adapters int32; seed: n_adapters×2 int32 (lo, hi words); thr: n_adapters int32 (8-bit
    threshold t); keep: n_adapters fp32 (1/(1 − p_eff)). BLOCK_K is a multiple of 16."""
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
        seed_lo = tl.load(seed_ptr + 2 * adapter)
        seed_hi = tl.load(seed_ptr + 2 * adapter + 1)
        threshold = tl.load(thr_ptr + adapter)
        k_groups = tl.cdiv(K, 16)  # dropout groups per row (lora_kernels/dropout.py: G = 16)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=pos_in[:, None] & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed_lo, seed_hi, threshold, rows, k0, k_groups, BLOCK_M, BLOCK_K)
            xt = apply_keep(xt, keep, DOT_FP32)
        at = tl.load(a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_in[:, None] & r_in[None, :], other=0.0)
        acc = mma(xt, at, acc, DOT_FP32, INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * tl.load(keep_ptr + adapter)

    u_ptrs = u_ptr + pid_s.to(tl.int64) * stride_us + pos[:, None].to(tl.int64) * stride_up + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=pos_in[:, None] & (offs_r[None, :] < R_MAX))


def check_dropout_tensors(n: int, seed_words: torch.Tensor, threshold: torch.Tensor, keep_scale: torch.Tensor,
                          device) -> None:
    """Per-adapter dropout arguments of the multi kernels: ``seed_words`` n×2 int32 (the lo/hi words
    of :func:`lora_kernels.dropout.seed_halves`), ``threshold`` n int32, ``keep_scale`` n fp32."""
    for name, t, shape, dtype in (("seed_words", seed_words, (n, 2), torch.int32),
                                  ("threshold", threshold, (n,), torch.int32),
                                  ("keep_scale", keep_scale, (n,), torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape}, got {got}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")


def lora_multi_shrink_fwd(x: torch.Tensor, stacked_a: torch.Tensor, plan, ranks: torch.Tensor,
                          seed_words: torch.Tensor, threshold: torch.Tensor, keep_scale: torch.Tensor,
                          has_dropout: bool) -> torch.Tensor:
    """u (S × P × r_max, x's dtype) for every (row block, slot) of ``plan`` in ONE launch.

    x: M×K; stacked_a: n×r_max×K; plan: a :class:`lora_kernels.multi.plan.RowPlan` built with
    ``block_m = multi_block_m(...)``. Columns of u past an adapter's rank are written as zeros.
    With ``has_dropout``, adapter a's input is x ⊙ Z_a: ``seed_words`` (n×2 int32), ``threshold``
    (n int32) and ``keep_scale`` (n fp32) as :func:`check_dropout_tensors` describes (an adapter with
    p = 0 has threshold 0 and keep-scale 1: everything kept).
    """
    K = x.shape[1]
    r_max = stacked_a.shape[1]
    S = plan.group_slots.shape[1]
    u = torch.empty((S, plan.rows.shape[0], r_max), dtype=x.dtype, device=x.device)
    if plan.rows.shape[0] == 0 or r_max == 0:
        return u.zero_()
    if has_dropout:
        check_dropout_tensors(stacked_a.shape[0], seed_words, threshold, keep_scale, x.device)
    block_r = configs.block_rank(r_max)
    meta = multi_config("multi_shrink", block_r, x.element_size())
    if meta["BLOCK_M"] != plan.block_m:
        raise ValueError(f"plan was cut into blocks of {plan.block_m} rows, the kernel uses {meta['BLOCK_M']}")
    grid = (plan.blk_group.shape[0], S)
    _lora_multi_shrink_kernel[grid](
        x, stacked_a, u, plan.rows, plan.blk_group, plan.blk_start, plan.group_end, plan.group_slots,
        ranks, seed_words, threshold, keep_scale,
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


# The in-register mask makes 16 consecutive elements of a row per Philox call: the K tile of the
# shrink and the N tile of the expand (which walks K for the backward's dx) start at multiples of 16.
assert all(t % GROUP == 0 for table in _MULTI_GPU_TABLE.values() for t, _ in table.values())
assert all(t % GROUP == 0 for c in MULTI_INTERPRETER_CONFIG.values() for k, t in c.items() if k != "BLOCK_M")


def multi_block_m() -> int:
    """The BLOCK_M both multi-adapter kernels use (the row plan must be cut with it)."""
    a = multi_config("multi_shrink")["BLOCK_M"]
    b = multi_config("multi_expand")["BLOCK_M"]
    assert a == b, "multi_shrink and multi_expand must share BLOCK_M"
    return a

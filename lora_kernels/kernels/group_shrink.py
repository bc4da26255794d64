"""The shrink of a shared-input projection group in one launch: ``_lora_group_shrink_kernel``.

Up to ``MAX_MEMBERS`` adapted projections read the same x (M×K): Llama's q/k/v, or gate/up. Each
program owns BLOCK_M rows, walks all of K, loads every x tile ONCE and computes, for every member i,

    u[:, off_i : off_i + r_i] = (x ⊙ Z_i)·A_iᵀ

with Z_i member i's own dropout mask regenerated in registers from its seed (the definition of
:mod:`lora_kernels.dropout`: the same bits as a single-layer shrink with that seed) and one fp32
accumulator per member. The keep bits multiply x (a product: NaN propagates) and the keep-scale
1/(1 − p_eff) scales each accumulator once. Without dropout the members' dots share the unmasked
tile. u is one M×Σr buffer (member i in its own columns), saved for backward as is.

Seeds are int32 words (lo, hi per member) listed in ``do_not_specialize``: a new seed never
recompiles. Every member's A is r_i×K with unit stride along K (the launcher checks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import GROUP, dropout_threshold, keep_scale, seed_halves
from . import configs
from .dropout import apply_keep, keep_tile, mma

MAX_MEMBERS = 4

# launches of the grouped kernels, counted by the launchers (tests assert one shrink per group and forward)
LAUNCHES = {"group_shrink": 0, "group_grad": 0}


@triton.jit
def _member_dot(acc, xt, a_ptr, R, offs_k, k_in, offs_r, offs_m, k0, k_groups, stride_ar,
                seed_lo, seed_hi, threshold,
                HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + (keep_i ⊙ x tile)·A_i[:, k0:k0+BLOCK_K]ᵀ for one member."""
    if HAS_DROPOUT:
        keep = keep_tile(seed_lo, seed_hi, threshold, offs_m, k0, k_groups, BLOCK_M, BLOCK_K)
        xt = apply_keep(xt, keep, DOT_FP32)
    at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None], mask=k_in[:, None] & (offs_r[None, :] < R),
                 other=0.0)
    return mma(xt, at, acc, DOT_FP32, INPUT_PRECISION)


@triton.jit
def _member_store(acc, u_ptr, offs_m, m_in, offs_r, R, OFF, stride_um, stride_ur, out_scale):
    tl.store(u_ptr + offs_m[:, None] * stride_um + (OFF + offs_r[None, :]) * stride_ur,
             (acc * out_scale).to(u_ptr.dtype.element_ty), mask=m_in[:, None] & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["lo0", "hi0", "lo1", "hi1", "lo2", "hi2", "lo3", "hi3"])
def _lora_group_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, u_ptr,
    M, K, R0, R1, R2, R3, OFF1, OFF2, OFF3,
    stride_xm, stride_xk, stride_ar0, stride_ar1, stride_ar2, stride_ar3, stride_um, stride_ur,
    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, threshold, out_scale,
    MEMBERS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: M×K (any strides); a_i: R_i×K (unit stride along K); u: M×(R0+...+R_{MEMBERS-1}), member i
    from column OFF_i (OFF0 = 0). Members past MEMBERS are never touched (their pointers alias a0).
    (lo_i, hi_i): member i's seed words; threshold: the 8-bit t shared by the group; out_scale: the
    keep-scale (1 without dropout). BLOCK_K is a multiple of 16 (one Philox call per 16 elements)."""
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    k_groups = tl.cdiv(K, 16)  # dropout groups per row (lora_kernels/dropout.py: G = 16)
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_in[:, None] & k_in[None, :], other=0.0)  # read once for every member
        acc0 = _member_dot(acc0, xt, a0_ptr, R0, offs_k, k_in, offs_r, offs_m, k0, k_groups, stride_ar0,
                           lo0, hi0, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 1:
            acc1 = _member_dot(acc1, xt, a1_ptr, R1, offs_k, k_in, offs_r, offs_m, k0, k_groups, stride_ar1,
                               lo1, hi1, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 2:
            acc2 = _member_dot(acc2, xt, a2_ptr, R2, offs_k, k_in, offs_r, offs_m, k0, k_groups, stride_ar2,
                               lo2, hi2, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
        if MEMBERS > 3:
            acc3 = _member_dot(acc3, xt, a3_ptr, R3, offs_k, k_in, offs_r, offs_m, k0, k_groups, stride_ar3,
                               lo3, hi3, threshold, HAS_DROPOUT, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_K)
    _member_store(acc0, u_ptr, offs_m, m_in, offs_r, R0, 0, stride_um, stride_ur, out_scale)
    if MEMBERS > 1:
        _member_store(acc1, u_ptr, offs_m, m_in, offs_r, R1, OFF1, stride_um, stride_ur, out_scale)
    if MEMBERS > 2:
        _member_store(acc2, u_ptr, offs_m, m_in, offs_r, R2, OFF2, stride_um, stride_ur, out_scale)
    if MEMBERS > 3:
        _member_store(acc3, u_ptr, offs_m, m_in, offs_r, R3, OFF3, stride_um, stride_ur, out_scale)


# Block sizes, as data. Interpreter: large blocks (its cost is per program and K step). GPU:
# (BLOCK_M, BLOCK_K, num_warps) per (fp32 operands?, padded rank), from a compile-only sm_90a review
# (triton 3.9, cuobjdump: no spills for 2..4 members; docs/performance-model.md); not timed yet.
INTERPRETER_CONFIG = {"group_shrink": dict(BLOCK_M=32, BLOCK_K=64), "group_grad": dict(BLOCK_M=32, BLOCK_K=64)}
_GPU_TABLE = {
    ("group_shrink", False): {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 8), 128: (64, 32, 8), 256: (32, 32, 8)},
    ("group_shrink", True): {16: (64, 32, 4), 32: (64, 32, 8), 64: (32, 32, 8), 128: (32, 16, 8), 256: (16, 16, 8)},
    ("group_grad", False): {16: (64, 64, 4), 32: (64, 64, 8), 64: (32, 64, 8), 128: (32, 32, 8), 256: (16, 32, 8)},
    ("group_grad", True): {16: (32, 32, 4), 32: (32, 32, 8), 64: (16, 32, 8), 128: (16, 16, 8), 256: (16, 16, 8)},
}
# (kind, fp32?, padded rank, members) -> config, where the table's spilled in that review: more
# members hold more fp32 accumulators (and, with dropout, more keep-bit tiles) per thread.
_GPU_OVERRIDES = {
    ("group_grad", False, 16, 4): (64, 64, 8),
    ("group_shrink", False, 256, 3): (16, 64, 8),
    ("group_shrink", False, 256, 4): (16, 32, 8),
    ("group_shrink", True, 16, 4): (32, 32, 4),
    ("group_shrink", True, 64, 4): (16, 32, 8),
}
# Known left: fp32 operands at padded rank 256 with 4 members spill in every config tried (16×16 on
# 8 warps: shrink 48-180 B, dA/dx 5.6 KB; on 4 warps worse) — FMA dots replicate their operands.
assert all(bk % GROUP == 0 for t in _GPU_TABLE.values() for _, bk, _ in t.values())
assert all(bk % GROUP == 0 for _, bk, _ in _GPU_OVERRIDES.values())


def group_config(kind: str, block_r: int, elem_bytes: int, members: int = 3) -> dict:
    """Meta-parameters of the grouped kernels (interpreter: fixed blocks; GPU: the tables above)."""
    if configs.is_interpreter():
        return dict(INTERPRETER_CONFIG[kind])
    fp32 = elem_bytes >= 4
    bm, bk, warps = _GPU_OVERRIDES.get((kind, fp32, block_r, members), _GPU_TABLE[(kind, fp32)][block_r])
    return dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=3)


def member_args(tensors: list[torch.Tensor], fill: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``tensors`` padded to MAX_MEMBERS with ``fill`` (default: the first), for the pointer slots."""
    fill = tensors[0] if fill is None else fill
    return list(tensors) + [fill] * (MAX_MEMBERS - len(tensors))


def seed_words(seeds: list[int]) -> list[int]:
    """(lo, hi) int32 words of each seed, flattened and padded to MAX_MEMBERS members."""
    words = []
    for s in list(seeds) + [0] * (MAX_MEMBERS - len(seeds)):
        words += seed_halves(s)
    return words


def check_members(lora_as: list[torch.Tensor]) -> None:
    if not 1 <= len(lora_as) <= MAX_MEMBERS:
        raise ValueError(f"a projection group has 1 to {MAX_MEMBERS} members, got {len(lora_as)}")
    for i, a in enumerate(lora_as):
        if a.shape[1] > 1 and a.stride(1) != 1:
            raise ValueError(f"lora_as[{i}] must have unit stride along K, got strides {a.stride()}")


def lora_group_shrink_fwd(x: torch.Tensor, lora_as: list[torch.Tensor], seeds: list[int],
                          dropout_p: float) -> torch.Tensor:
    """u = [(x ⊙ Z_1)·A_1ᵀ, (x ⊙ Z_2)·A_2ᵀ, ...] (M × Σr_i, x's dtype) in ONE launch."""
    check_members(lora_as)
    M, K = x.shape
    ranks = [a.shape[0] for a in lora_as]
    u = torch.empty((M, sum(ranks)), dtype=x.dtype, device=x.device)
    if M == 0:
        return u
    if K == 0:
        return u.zero_()
    offs = [sum(ranks[:i]) for i in range(MAX_MEMBERS)]
    rs = ranks + [0] * (MAX_MEMBERS - len(ranks))
    a_args = member_args(lora_as)
    has_dropout = dropout_p > 0.0
    block_r = configs.block_rank(max(ranks))
    meta = group_config("group_shrink", block_r, x.element_size(), len(lora_as))
    LAUNCHES["group_shrink"] += 1
    _lora_group_shrink_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
        x, *a_args, u,
        M, K, *rs, *offs[1:],
        x.stride(0), x.stride(1), *(a.stride(0) for a in a_args), u.stride(0), u.stride(1),
        *seed_words(seeds), dropout_threshold(dropout_p), keep_scale(dropout_p) if has_dropout else 1.0,
        MEMBERS=len(lora_as), HAS_DROPOUT=has_dropout, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(x.dtype), BLOCK_R=block_r, **meta,
    )
    return u

"""Per-adapter weight gradients over grouped rows, one launch: ``_lora_multi_outer_kernel``.

    out[a] = scale_a · Σ_{pos in group g} L[pos]ᵀ ⊗ R[pos]      (a = group_slots[g, s])

summed over the group's rows in a fixed order by a single program per output tile (deterministic,
no atomics). With the row plan of :mod:`.multi_shrink`:

- dA[a] = s_a · vᵀ·(x ⊙ Z_a)  (r × K):  L = v[s] (by position), R = x (gathered by row, mask regenerated)
- dB[a] = s_a · gᵀ·u          (N × r):  L = g (gathered by row), R = u[s] (by position)

Each adapter sits in exactly one (group, slot) of a plan, so no two programs write the same tile.
One program walks all of its group's rows: fine for decode/fine-tuning batches of a few thousand
rows per adapter; a split over rows with a fixed-order sum is the next step for longer groups.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import apply_keep, keep_tile, mma
from .multi_shrink import check_dropout_tensors


@triton.jit
def _lora_multi_outer_kernel(
    l_ptr, r_ptr, out_ptr, rows_ptr, group_start_ptr, group_end_ptr, group_slots_ptr, scale_ptr,
    seed_ptr, thr_ptr, keep_ptr,
    I, J, S, mask_row_len,
    stride_ls, stride_lp, stride_li, stride_rs, stride_rp, stride_rj, stride_on, stride_oi, stride_oj, stride_gs,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, R_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """l: (S×)P×I or M×I (L_GATHER: row-indexed, no slot axis); r: likewise with J; out: n×I×J fp32.
    rows / group_start / group_end / group_slots: the row plan; scale: n fp32. R_DROPOUT: R[pos, j] is
    multiplied by the keep bit of element (rows[pos], j) of adapter a's M×mask_row_len mask (seed:
    n×2 int32 lo/hi words, thr: n int32) and the sum by keep: n fp32 (1/(1 − p_eff)); BLOCK_J is
    then a multiple of 16."""
    pid_gs = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    g = pid_gs // S
    s = pid_gs % S
    adapter = tl.load(group_slots_ptr + g * stride_gs + s)
    if adapter < 0:
        return
    start = tl.load(group_start_ptr + g)
    end = tl.load(group_end_ptr + g)
    offs_i = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_in = offs_i < I
    j_in = offs_j < J
    l_base = l_ptr
    r_base = r_ptr
    if not L_GATHER:
        l_base = l_ptr + s.to(tl.int64) * stride_ls
    if not R_GATHER:
        r_base = r_ptr + s.to(tl.int64) * stride_rs
    if R_DROPOUT:
        seed_lo = tl.load(seed_ptr + 2 * adapter)
        seed_hi = tl.load(seed_ptr + 2 * adapter + 1)
        threshold = tl.load(thr_ptr + adapter)
        k_groups = tl.cdiv(mask_row_len, 16)  # dropout groups per row (lora_kernels/dropout.py: G = 16)
        j_start = pid_j.to(tl.int64) * BLOCK_J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        pos_in = pos < end
        rows = tl.load(rows_ptr + pos, mask=pos_in, other=0)
        l_idx = rows if L_GATHER else pos.to(tl.int64)
        r_idx = rows if R_GATHER else pos.to(tl.int64)
        lt = tl.load(l_base + l_idx[None, :] * stride_lp + offs_i[:, None] * stride_li,
                     mask=i_in[:, None] & pos_in[None, :], other=0.0)  # BLOCK_I × BLOCK_P (Lᵀ)
        rt = tl.load(r_base + r_idx[:, None] * stride_rp + offs_j[None, :] * stride_rj,
                     mask=pos_in[:, None] & j_in[None, :], other=0.0)  # BLOCK_P × BLOCK_J
        if R_DROPOUT:
            keep = keep_tile(seed_lo, seed_hi, threshold, rows, j_start, k_groups, BLOCK_P, BLOCK_J)
            rt = apply_keep(rt, keep, DOT_FP32)
        acc = mma(lt, rt, acc, DOT_FP32, INPUT_PRECISION)
    scale = tl.load(scale_ptr + adapter)
    if R_DROPOUT:
        scale = scale * tl.load(keep_ptr + adapter)
    out_ptrs = out_ptr + adapter.to(tl.int64) * stride_on + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    tl.store(out_ptrs, acc * scale, mask=i_in[:, None] & j_in[None, :])


def outer_config(block_r: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_P, wide tile, num_warps). Interpreter: (32, 64, -). GPU: a compile-only sm_90a review
    (Triton 3.6 and 3.9, cuobjdump): no spills, except at most 16 bytes for fp32 at rank 256. With
    the 8-bit mask (issue 13), 16-bit dA with dropout at padded rank 32 spilled 8 bytes with 8 warps
    and none with 4 (Triton 3.9; dB too), hence 4 warps there."""
    if configs.is_interpreter():
        return 32, 64, 4
    if elem_bytes >= 4:
        return (32, 64, 8) if block_r <= 32 else (32, 32, 8) if block_r <= 128 else (16, 32, 8)
    if block_r == 32:
        return 32, 64, 4
    return (32, 64, 8) if block_r <= 128 else (32, 32, 8)


def _launch_outer(l, r, out, plan, scales, *, l_gather, r_gather, seed_words=None, threshold=None,
                  keep_scale=None, mask_row_len=0):
    S = plan.group_slots.shape[1]
    G = plan.group_slots.shape[0]
    n, I, J = out.shape
    if G * S == 0 or I == 0 or J == 0 or plan.rows.shape[0] == 0:
        return out
    block_r = configs.block_rank(J if l_gather else I)
    block_p, wide, warps = outer_config(block_r, l.element_size())
    # the rank side (J for dB, I for dA) is one whole tile; the wide side (N or K) is tiled
    block_i, block_j = (wide, block_r) if l_gather else (block_r, wide)
    dropout = seed_words is not None
    if dropout:
        check_dropout_tensors(n, seed_words, threshold, keep_scale, out.device)
        assert block_j % 16 == 0, "the masked side's tile must be a multiple of 16 (one Philox call each)"
    lk = (0, l.stride(0), l.stride(1)) if l_gather else (l.stride(0), l.stride(1), l.stride(2))
    rk = (0, r.stride(0), r.stride(1)) if r_gather else (r.stride(0), r.stride(1), r.stride(2))
    grid = (G * S, triton.cdiv(I, block_i), triton.cdiv(J, block_j))
    _lora_multi_outer_kernel[grid](
        l, r, out, plan.rows, plan.group_start, plan.group_end, plan.group_slots, scales,
        seed_words if dropout else plan.group_slots, threshold if dropout else plan.group_slots,
        keep_scale if dropout else scales,
        I, J, S, mask_row_len,
        *lk, *rk, out.stride(0), out.stride(1), out.stride(2), plan.group_slots.stride(0),
        L_GATHER=l_gather, R_GATHER=r_gather, R_DROPOUT=dropout, DOT_FP32=configs.dot_fp32(),
        INPUT_PRECISION=configs.input_precision(l.dtype), BLOCK_P=block_p, BLOCK_I=block_i, BLOCK_J=block_j,
        **({} if configs.is_interpreter() else dict(num_warps=warps, num_stages=3)),
    )
    return out


def lora_multi_a_grad(v, x, plan, n_adapters, r_max, scales, seed_words=None, threshold=None, keep_scale=None):
    """dA stacked (n × r_max × K, fp32): s_a · vᵀ·(x ⊙ Z_a) over each adapter's rows (Z_a from
    ``seed_words`` / ``threshold`` / ``keep_scale`` as in ``check_dropout_tensors``; none: no dropout)."""
    K = x.shape[1]
    out = torch.zeros((n_adapters, r_max, K), dtype=torch.float32, device=x.device)
    return _launch_outer(v, x, out, plan, scales, l_gather=False, r_gather=True, seed_words=seed_words,
                         threshold=threshold, keep_scale=keep_scale, mask_row_len=K)


def lora_multi_b_grad(g, u, plan, n_adapters, r_max, scales):
    """dB stacked (n × N × r_max, fp32): s_a · gᵀ·u over each adapter's rows."""
    N = g.shape[1]
    out = torch.zeros((n_adapters, N, r_max), dtype=torch.float32, device=g.device)
    return _launch_outer(g, u, out, plan, scales, l_gather=True, r_gather=False)

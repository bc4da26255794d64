"""Row plans: which rows of a batch go through which adapters, grouped for one kernel launch.

A :class:`RowPlan` describes G groups of rows. Group g owns positions ``[group_start[g],
group_end[g])`` of ``rows`` (original row numbers of the flattened M×K input) and an ordered list of
S adapter slots ``group_slots[g]`` (−1 = empty). Two plans cover everything this package does:

- :func:`mixed_batch_plan` (``adapter_names=``): one group per adapter (its rows, sorted stably by
  adapter with a counting sort), one slot. Rows with index −1 (no adapter, PEFT's ``"__base__"``)
  are in no group: the kernels never touch them.
- :func:`active_adapters_plan` (several active adapters): one group with every row, one slot per
  active adapter, applied in order.

The row-block table (``blk_group``, ``blk_start``) cuts every group into blocks of ``block_m`` rows
that never straddle two groups. Its length is the bound cdiv(M, block_m) + G, computed on the host
from sizes only; the unused tail is marked −1. Everything else is built with device ops, so a plan
costs no device-to-host synchronisation (and no Python loop over rows or adapters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowPlan:
    rows: torch.Tensor         # (P,) int64: original row numbers, grouped
    group_start: torch.Tensor  # (G,) int32
    group_end: torch.Tensor    # (G,) int32
    group_slots: torch.Tensor  # (G, S) int32: adapter index per slot, −1 = none
    blk_group: torch.Tensor    # (T,) int32: group of each row block, −1 = unused
    blk_start: torch.Tensor    # (T,) int32: first position (into rows) of each row block
    block_m: int

    @property
    def num_slots(self) -> int:
        return self.group_slots.shape[1]


def _block_table(counts: torch.Tensor, starts: torch.Tensor, total_rows: int, block_m: int):
    """Cut groups of ``counts`` rows (starting at ``starts``) into blocks of block_m rows."""
    device = counts.device
    n_groups = counts.shape[0]
    t = -(-total_rows // block_m) + n_groups  # host-side bound: no sync
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    b = torch.arange(t, device=device, dtype=torch.int64)
    group = torch.searchsorted(ends, b, right=True)
    used = group < n_groups
    g = group.clamp_max(max(n_groups - 1, 0))
    first_block = ends[g] - blocks[g] if n_groups else b
    start = starts[g] + (b - first_block) * block_m if n_groups else b
    blk_group = torch.where(used, group, torch.full_like(group, -1)).to(torch.int32)
    blk_start = torch.where(used, start, torch.zeros_like(start)).to(torch.int32)
    return blk_group, blk_start


def mixed_batch_plan(row_adapter: torch.Tensor, n_adapters: int, block_m: int) -> RowPlan:
    """Group rows by ``row_adapter`` (M int64, −1 = no adapter, else in [0, n_adapters))."""
    device = row_adapter.device
    idx = row_adapter.to(torch.int64)
    m = idx.shape[0]
    # counting sort: key n_adapters for base rows puts them last; stable keeps row order per adapter
    key = torch.where(idx < 0, torch.full_like(idx, n_adapters), idx)
    order = torch.sort(key, stable=True).indices
    counts_all = torch.bincount(key, minlength=n_adapters + 1)
    counts = counts_all[:n_adapters]
    starts = torch.cumsum(counts, 0) - counts
    blk_group, blk_start = _block_table(counts, starts, m, block_m)  # bound from M: no sync
    slots = torch.arange(n_adapters, device=device, dtype=torch.int32)[:, None]
    # rows of the base (key n_adapters) sit past the last group's end: never read
    return RowPlan(order, starts.to(torch.int32), (starts + counts).to(torch.int32), slots.contiguous(),
                   blk_group, blk_start, block_m)


def active_adapters_plan(m: int, slots: list[int], block_m: int, device) -> RowPlan:
    """Every one of the m rows goes through the adapters ``slots`` (indices, applied in order)."""
    rows = torch.arange(m, device=device, dtype=torch.int64)
    counts = torch.tensor([m], device=device, dtype=torch.int64)
    starts = torch.zeros(1, device=device, dtype=torch.int64)
    blk_group, blk_start = _block_table(counts, starts, m, block_m)
    group_slots = torch.tensor([list(slots)], device=device, dtype=torch.int32)
    return RowPlan(rows, starts.to(torch.int32), counts.to(torch.int32), group_slots, blk_group, blk_start, block_m)

"""Shared-input projection groups: what grouping saves, modeled (never measured), and the grouped
kernels' compile-only review.

- :func:`modeled_saving` compares, launch by launch, a group computed by the grouped op
  (:func:`lora_kernels.grouped.grouped_lora`) with its members computed as separate layers, both on
  the hybrid structure (cuBLAS base GEMMs + Triton LoRA kernels; the base GEMMs and the per-member
  epilogue / v+dB launches are the same on both sides and included). What differs: the shrink reads
  x once instead of once per member; the backward's dA/dx-LoRA launch reads x once and dx once
  instead of per member; the members' base dx accumulate into one buffer (cuBLAS addmm_, beta = 1)
  instead of being summed by autograd (one M×K add per extra member: read two, write one).
  Per launch t = max(FLOPs / peak, bytes / HBM bandwidth, mask instructions / issue rate) + launch
  overhead (lora_kernels.perf.roofline's helpers and GPU figures).
- :func:`compile_review` compiles the grouped kernels' recorded launches (fake CUDA tensors, no GPU)
  for sm_90a and reads registers, spills and main-loop SASS per element (needs TRITON_INTERPRET unset).

Every time and byte count from this module is **modeled**.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import H200, GPU
from .roofline import EFFICIENCIES, LaunchCost, gemm_op, op_cost

LLAMA3_8B_GROUPS = {"q/k/v": (4096, (4096, 1024, 1024)), "gate/up": (4096, (14336, 14336))}

# Mask cost: SASS instructions per element per mask, from the compile-only sm_90a review of the
# grouped shrink (bf16, r = 16, triton 3.9: main loop with dropout minus without, per member);
# docs/performance-model.md lists the review. The single-layer shrink measures about the same (~9).
RNG_INSTRUCTIONS_PER_ELEMENT = 9.0


@dataclass
class Pattern:
    name: str
    launches: list

    @property
    def time_s(self) -> float:
        return sum(c.t for c in self.launches)

    @property
    def bytes(self) -> float:
        return sum(c.bytes_hbm for c in self.launches)

    def as_dict(self) -> dict:
        return dict(name=self.name, launches=len(self.launches), time_us=self.time_s * 1e6,
                    hbm_bytes=self.bytes, modeled=True)


def _streaming(name, stage, gpu, eff, nbytes, flops=0.0, masked=0.0):
    """A Triton streaming launch (shrink-like): memory, MMA or mask-issue bound."""
    c = op_cost(name, stage, gpu, eff, flops=flops, nbytes=nbytes, gemm=False)
    c.gemm_lib = "triton"
    c.t_mma = flops / (gpu.bf16_flops * eff)
    c.rng_instructions = masked * RNG_INSTRUCTIONS_PER_ELEMENT
    c.t_rng = c.rng_instructions / gpu.instructions_per_s
    c.t = max(c.t_mma, c.t_mem, c.t_rng) + gpu.launch_overhead_s
    return c


def _member_common(M, K, N, r, e, gpu, eff, i) -> tuple[list, list]:
    """Launches a member needs on both sides: its base GEMMs, the expand epilogue, v + dB."""
    fwd = [gemm_op(f"cuBLAS y{i} = x·W{i}ᵀ", "fwd", M, N, K, e, gpu, eff),
           _streaming(f"epilogue y{i} += s·u{i}·B{i}ᵀ", "fwd", gpu, eff, 2 * M * N * e + (M + N) * r * e,
                      flops=2.0 * M * N * r)]
    bwd = [_streaming(f"v{i} = g{i}·B{i}, dB{i}", "bwd", gpu, eff, 2 * M * N * e + 2 * M * r * e + N * r * e,
                      flops=4.0 * M * N * r)]
    return fwd, bwd


def ungrouped(M, K, ns, r, p, e=2, gpu: GPU = H200, efficiency="realistic") -> Pattern:
    eff = EFFICIENCIES[efficiency]["cublas"]
    teff = EFFICIENCIES[efficiency]["triton"]
    masked = M * K if p > 0 else 0.0
    ops = []
    for i, N in enumerate(ns):
        fwd, bwd = _member_common(M, K, N, r, e, gpu, teff, i)
        ops.append(_streaming(f"shrink u{i} = (x⊙Z{i})·A{i}ᵀ (reads x)", "fwd", gpu, teff,
                              M * K * e + r * K * e + M * r * e, flops=2.0 * M * K * r, masked=masked))
        ops += fwd + bwd
        ops.append(gemm_op(f"cuBLAS dx{i} = g{i}·W{i}", "bwd", M, K, N, e, gpu, eff))
        ops.append(_streaming(f"dA{i} + dx{i} += s·(v{i}·A{i})⊙Z{i} (reads x, dx{i})", "bwd", gpu, teff,
                              3 * M * K * e + 2 * M * r * e + 2 * r * K * e, flops=4.0 * M * K * r,
                              masked=2 * masked))
    for i in range(1, len(ns)):  # autograd sums the members' dx
        ops.append(op_cost(f"autograd dx += dx{i}", "bwd", gpu, eff, nbytes=3 * M * K * e))
    return Pattern("ungrouped", ops)


def grouped(M, K, ns, r, p, e=2, gpu: GPU = H200, efficiency="realistic") -> Pattern:
    eff = EFFICIENCIES[efficiency]["cublas"]
    teff = EFFICIENCIES[efficiency]["triton"]
    n = len(ns)
    masked = M * K if p > 0 else 0.0
    ops = [_streaming("group shrink u = [(x⊙Z_i)·A_iᵀ] (reads x once)", "fwd", gpu, teff,
                      M * K * e + n * r * K * e + n * M * r * e, flops=2.0 * M * K * r * n, masked=n * masked)]
    for i, N in enumerate(ns):
        fwd, bwd = _member_common(M, K, N, r, e, gpu, teff, i)
        ops += fwd + bwd
        ops.append(gemm_op(f"cuBLAS dx {'=' if i == 0 else '+='} g{i}·W{i}", "bwd", M, K, N, e, gpu, eff,
                           accumulate=i > 0))
    ops.append(_streaming("group dA_i + dx += Σ s_i·(v_i·A_i)⊙Z_i (reads x, dx once)", "bwd", gpu, teff,
                          3 * M * K * e + 2 * n * M * r * e + 2 * n * r * K * e, flops=4.0 * M * K * r * n,
                          masked=2 * n * masked))
    return Pattern("grouped", ops)


def modeled_saving(M=8192, r=16, dropouts=(0.0, 0.1), e=2, gpu: GPU = H200, efficiency="realistic",
                   groups=LLAMA3_8B_GROUPS) -> list[dict]:
    """One row per (group, p): modeled HBM bytes, time and launches, grouped vs ungrouped."""
    rows = []
    for name, (K, ns) in groups.items():
        for p in dropouts:
            a, b = ungrouped(M, K, ns, r, p, e, gpu, efficiency), grouped(M, K, ns, r, p, e, gpu, efficiency)
            rows.append(dict(group=name, M=M, K=K, N=list(ns), r=r, p=p, dtype="bf16" if e == 2 else f"{e} B",
                             gpu=gpu.name, efficiency=efficiency,
                             x_reads=(len(ns) * 2, 2), dx_passes=_dx_passes(len(ns)),
                             ungrouped_launches=len(a.launches), grouped_launches=len(b.launches),
                             ungrouped_bytes=a.bytes, grouped_bytes=b.bytes,
                             ungrouped_us=a.time_s * 1e6, grouped_us=b.time_s * 1e6,
                             saved_bytes=a.bytes - b.bytes, saved_us=(a.time_s - b.time_s) * 1e6,
                             ratio=b.time_s / a.time_s, modeled=True))
    return rows


def _dx_passes(n: int) -> tuple[int, int]:
    """M×K passes over dx buffers in backward (reads + writes), ungrouped vs grouped, beyond the first
    cuBLAS write: ungrouped n LoRA read+writes + 3 per autograd add; grouped n − 1 cuBLAS
    accumulations (read + write) + one LoRA read+write."""
    return 2 * n + 3 * (n - 1), 2 * (n - 1) + 2


def markdown(rows: list[dict]) -> str:
    head = ("| group (K → N) | p | x reads fwd+bwd (ungrouped → grouped) | dx passes | launches | "
            "HBM GB | time µs | grouped / ungrouped |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['group']} ({r['K']} → {'/'.join(map(str, r['N']))}) | {r['p']} | "
                     f"{r['x_reads'][0]} → {r['x_reads'][1]} | {r['dx_passes'][0]} → {r['dx_passes'][1]} | "
                     f"{r['ungrouped_launches']} → {r['grouped_launches']} | "
                     f"{r['ungrouped_bytes'] / 1e9:.2f} → {r['grouped_bytes'] / 1e9:.2f} | "
                     f"{r['ungrouped_us']:.0f} → {r['grouped_us']:.0f} | {r['ratio']:.3f} |")
    return head + "\n".join(lines) + "\n"


# -- compile-only review of the grouped kernels -------------------------------------------------------

def capture_group_kernels(M=8192, K=4096, ranks=(16, 16, 16), p=0.1, dtype="bfloat16", target_programs=264,
                          device="auto"):
    """Record the grouped shrink and grouped dA/dx launches for one group: on fake CUDA tensors, or
    (``device='meta'``, and 'auto' where torch's fake CUDA needs a driver, e.g. torch 2.11) meta tensors."""
    import contextlib
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .capture import _modeled_cuda, recording

    if device == "auto":
        try:
            return capture_group_kernels(M, K, ranks, p, dtype, target_programs, "cuda-fake")
        except RuntimeError:
            return capture_group_kernels(M, K, ranks, p, dtype, target_programs, "meta")
    fake = device == "cuda-fake"
    dt = getattr(torch, dtype)
    env = (_modeled_cuda(target_programs // 2, 90), FakeTensorMode()) if fake else (contextlib.nullcontext(),) * 2
    with env[0], env[1], warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        from ..kernels.group_grad import lora_group_grad_bwd
        from ..kernels.group_shrink import lora_group_shrink_fwd

        kw = dict(device="cuda" if fake else "meta", dtype=dt)
        x = torch.empty(M, K, **kw)
        a_s = [torch.empty(r, K, **kw) for r in ranks]
        v = torch.empty(M, sum(ranks), **kw)
        dx = torch.empty(M, K, **kw)
        seeds = list(range(1, len(ranks) + 1))
        with recording(False, target_programs) as rec, contextlib.nullcontext():
            rec.stage = "fwd"
            lora_group_shrink_fwd(x, a_s, seeds, p)
            rec.stage = "bwd"
            lora_group_grad_bwd(x, v, a_s, [1.0] * len(ranks), seeds, p, dx)
    return [launch for launch in rec.launches if launch.kind == "triton"]


def compile_review(members=(2, 3, 4), ranks=(16, 64, 256), dropouts=(0.0, 0.1), dtypes=("bfloat16", "float32"),
                   target="sm_90a", M=8192, K=4096) -> list[dict]:
    """Registers, spills and main-loop SASS instructions per element of the grouped kernels' default
    configs, compiled for ``target`` (compile only). Per element: main-loop instructions × threads /
    (BLOCK_M × BLOCK_K) — for the dA/dx kernel the dA loop (x tiles) is the main loop."""
    from .compile import compile_launch
    from .sass import inspect_binary

    rows = []
    for dtype in dtypes:
        for r in ranks:
            for n in members:
                for p in dropouts:
                    for launch in capture_group_kernels(M, K, (r,) * n, p, dtype):
                        rep = inspect_binary(compile_launch(launch, target), H200)
                        bm, bk = launch.params["BLOCK_M"], launch.params["BLOCK_K"]
                        per_elem = rep.main_loop_instructions * 32 * rep.num_warps / (bm * bk)
                        rows.append(dict(kernel=launch.name, members=n, r=r, p=p, dtype=dtype, BLOCK_M=bm,
                                         BLOCK_K=bk, BLOCK_R=launch.params["BLOCK_R"], num_warps=rep.num_warps,
                                         registers=rep.registers, spill_bytes=rep.spill_stores + rep.spill_loads,
                                         stl=rep.stl, ldl=rep.ldl, mma=rep.mma_kind, shared=rep.shared,
                                         ctas_per_sm=rep.ctas_per_sm, sass_per_element=per_elem,
                                         sass_per_element_per_member=per_elem / n, target=target))
    return rows


def review_markdown(rows: list[dict]) -> str:
    head = ("| kernel | dtype | r | members | p | BLOCK_M×BLOCK_K / warps | regs | spills (B) | MMA | "
            "SASS/elem (per member) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['kernel'].replace('_lora_', '').replace('_kernel', '')} | {r['dtype']} | {r['r']} | {r['members']} | "
        f"{r['p']} | {r['BLOCK_M']}×{r['BLOCK_K']} / {r['num_warps']} | {r['registers']} | {r['spill_bytes']} | "
        f"{r['mma']} | {r['sass_per_element']:.1f} ({r['sass_per_element_per_member']:.1f}) |" for r in rows) + "\n"


__all__ = ["LLAMA3_8B_GROUPS", "compile_review", "grouped", "markdown", "modeled_saving", "review_markdown",
           "ungrouped"]

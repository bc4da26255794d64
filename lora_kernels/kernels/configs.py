"""Block sizes and autotune configs for every kernel, as data, in one place.

Keyed on (M bucket, N, K, R): M changes with every batch, so it is rounded up to a power of two
to avoid re-tuning at every new sequence length. Under the interpreter (and whenever
``LORA_KERNELS_AUTOTUNE=0``) one fixed small config is used, so tests are reproducible and fast.

These GPU lists are a starting point chosen from the usual Hopper GEMM tiles; they have not been
tuned on a GPU yet (see docs/benchmarks.md for what was measured).
"""
from __future__ import annotations

import os

import triton

from .._triton_env import is_interpreter  # noqa: F401  (re-exported for the launchers)

# One config per kernel for the interpreter: big enough to keep the interpreter fast (its cost is
# per program and per loop step), small enough that test shapes of ~100 still span several blocks.
INTERPRETER_CONFIG = {
    "shrink": dict(BLOCK_P=32, BLOCK_Q=64),
    "linear_fwd": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
    "linear_bwd": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
    "dora_mag": dict(BLOCK_M=32, BLOCK_N=64),
    "dora_norm": dict(BLOCK_N=32, BLOCK_K=64),
}

# The fixed config used on a GPU when autotuning is switched off.
GPU_FIXED_CONFIG = {
    "shrink": triton.Config(dict(BLOCK_P=64, BLOCK_Q=64), num_warps=4, num_stages=3),
    "linear_fwd": triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
    "linear_bwd": triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), num_warps=4, num_stages=3),
    # a memory-bound column reduction: not autotuned
    "dora_mag": triton.Config(dict(BLOCK_M=32, BLOCK_N=256), num_warps=4, num_stages=3),
    # one pass over W per step, bandwidth-bound: not autotuned
    "dora_norm": triton.Config(dict(BLOCK_N=64, BLOCK_K=128), num_warps=4, num_stages=3),
}

# Small tiles only fp32 operands use (see _FP32_CONFIGS below); pruned for fp16/bf16.
_FP32_EXTRA = {
    "linear_fwd": [(32, 32, 32, 4, 3), (32, 32, 16, 8, 3), (16, 32, 16, 4, 3)],
    "linear_bwd": [(32, 32, 32, 8, 3), (16, 32, 16, 8, 3)],
    "shrink": [(32, 32, 8, 3)],
}

_GPU_CONFIGS = {
    "shrink": [
        triton.Config(dict(BLOCK_P=bp, BLOCK_Q=bq), num_warps=w, num_stages=s)
        for bp, bq, w, s in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)]
        + _FP32_EXTRA["shrink"]
    ],
    "linear_fwd": [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 64, 8, 3),
            (64, 64, 32, 8, 3),
        ] + _FP32_EXTRA["linear_fwd"]
    ],
    "linear_bwd": [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 64, 128, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 64, 128, 4, 3),
            (64, 64, 64, 4, 4),
            (64, 32, 64, 4, 4),
            (64, 64, 64, 8, 3),
            (64, 32, 64, 8, 3),
            (64, 32, 32, 8, 3),
        ] + _FP32_EXTRA["linear_bwd"]
    ],
}

# fp32 operands ("ieee" dots are FMA loops whose operands are replicated across threads): only these
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) compiled without spills in issue 13's compile-only
# sweep (DoRA with dropout, the largest variant, as the test case; the shrink with dropout and the
# v+dB launch), per padded rank; for fp32 they replace every other rule (the Philox-sharing rule
# included: FMA dots dominate there). A rank uses the list of the next listed rank up.
# Left: the dx kernel at rank 256 spilled in every shape tried (least: 16×32×16 / 8 warps, 144 B).
_FP32_CONFIGS = {
    "linear_fwd": {
        16: [(64, 64, 64, 4, 4), (64, 64, 64, 8, 3), (64, 64, 32, 8, 3)],
        64: [(64, 64, 32, 8, 3), (32, 32, 32, 4, 3)],
        128: [(32, 32, 32, 4, 3)],
        256: [(32, 32, 16, 8, 3), (16, 32, 16, 4, 3)],
    },
    "linear_bwd": {
        16: [(64, 32, 32, 8, 3), (32, 32, 32, 8, 3), (16, 32, 16, 8, 3)],
        64: [(32, 32, 32, 8, 3), (16, 32, 16, 8, 3)],
        128: [(16, 32, 16, 8, 3)],
        256: [(16, 32, 16, 8, 3)],
    },
    # (BLOCK_P, BLOCK_Q, num_warps, num_stages); the shrink with dropout and the v+dB launch
    "shrink": {
        64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)],
        128: [(64, 64, 8, 3)],
        256: [(32, 32, 8, 3)],
    },
}


# fp32 operands with a 4-bit weight decoded in the loop (QUANT): the decoded tile adds to the FMA dots'
# registers; in the compile-only check of issue 17 (sm_90a, triton 3.9; LoRA and DoRA, p 0 and 0.1,
# ranks 16 and 64) only these listed candidates compiled without spills in both GEMMs (the dense
# fp32 defaults spilled up to 24 KB: the forward 64×64×64 / 4 warps).
_FP32_QUANT_CONFIGS = {"linear_fwd": [(32, 32, 16, 8, 3)], "linear_bwd": [(32, 32, 32, 8, 3)]}


def _key(cfg: triton.Config) -> tuple:
    kw = cfg.kwargs
    if "BLOCK_P" in kw:
        return (kw["BLOCK_P"], kw["BLOCK_Q"], cfg.num_warps, cfg.num_stages)
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)


def _fp32_allowed(kind: str, block_r: int) -> list:
    table = _FP32_CONFIGS[kind]
    return table[min(r for r in table if r >= block_r)]


_FP32_ONLY = {kind: set(extra) for kind, extra in _FP32_EXTRA.items()}

# Register / shared-memory budgets, from ptxas -v on sm_90 (a compile-only review; see
# docs/architecture.md): the rank-wide tiles (u·Bᵀ, v·A, the dA accumulator) keep the other tile dims
# <= 64 at R = 256 and <= 128 at R = 128, and ranks >= 128 need 8 warps to hold their fp32
# accumulators without spilling (fp32 operands: see _FP32_CONFIGS).
_MAX_TILE_WITH_RANK = 64 * 256


# Prune rules added from the compile-only sweep of issue 13 (every candidate compiled for sm_90a with
# the triton 3.9 wheel, run-time specialisation: aligned pointers, unit inner strides):
# - a Philox call covers 16 elements, so a dropout tile with fewer than 16 elements per thread makes
#   threads compute the same calls (64×32 tiles on 8 warps: 17.8 extra SASS/element instead of ~9);
# - DoRA with dropout keeps two fp32 output tiles (and the dx kernel's rank operands beside them):
#   more than 64 tile elements per thread spilled (forward 128×256/8 warps, 128×128/4 warps), and so
#   did the dx tile 128×64 on 4 warps (64 per thread): 4-warp dx tiles are held to 32 per thread;
#   at ranks >= 128 the forward 128×128/8 warps spilled too (32 B): the bound halves there.
MIN_DROPOUT_ELEMS_PER_THREAD = 16
MAX_DORA_DROPOUT_ELEMS_PER_THREAD = {"linear_fwd": {4: 64, 8: 64}, "linear_bwd": {4: 32, 8: 64}}
DORA_DROPOUT_HIGH_RANK = 128  # from this padded rank on, the DoRA bound above is halved


def _per_thread(rows: int, cols: int, num_warps: int) -> float:
    return rows * cols / (32 * num_warps)


def _fits(kind: str, cfg: triton.Config, block_r: int, elem_bytes: int = 2, flags: dict | None = None) -> bool:
    kw = cfg.kwargs
    flags = flags or {}
    if flags.get("QUANT") and elem_bytes >= 4 and kind in _FP32_QUANT_CONFIGS:
        return _key(cfg) in _FP32_QUANT_CONFIGS[kind]
    if kind in _FP32_CONFIGS:
        if elem_bytes >= 4:
            return _key(cfg) in _fp32_allowed(kind, block_r)
        if _key(cfg) in _FP32_ONLY[kind]:
            return False
    if block_r >= 128 and cfg.num_warps < 8:
        return False
    if kind == "shrink" and flags.get("HAS_DROPOUT") and \
            _per_thread(kw["BLOCK_P"], kw["BLOCK_Q"], cfg.num_warps) < MIN_DROPOUT_ELEMS_PER_THREAD:
        return False
    if kind in ("linear_fwd", "linear_bwd"):
        rows, cols = (kw["BLOCK_M"], kw["BLOCK_N"]) if kind == "linear_fwd" else (kw["BLOCK_M"], kw["BLOCK_K"])
        per_thread = _per_thread(rows, cols, cfg.num_warps)
        if kind == "linear_bwd" and flags.get("HAS_DROPOUT") and per_thread < MIN_DROPOUT_ELEMS_PER_THREAD:
            return False
        if flags.get("DORA_DROPOUT"):
            bound = MAX_DORA_DROPOUT_ELEMS_PER_THREAD[kind].get(cfg.num_warps, 32)
            if per_thread > (bound // 2 if block_r >= DORA_DROPOUT_HIGH_RANK else bound):
                return False
    if kind == "shrink":
        return kw["BLOCK_P"] * block_r <= 2 * _MAX_TILE_WITH_RANK
    rows, cols = (kw["BLOCK_M"], kw["BLOCK_N"]) if kind == "linear_fwd" else (kw["BLOCK_M"], kw["BLOCK_K"])
    return max(rows, cols) * block_r <= _MAX_TILE_WITH_RANK


def use_fixed_config() -> bool:
    return is_interpreter() or os.environ.get("LORA_KERNELS_AUTOTUNE", "1") == "0"


def fixed_config(kind: str, block_r: int = 16, elem_bytes: int = 2, flags: dict | None = None) -> dict:
    """Meta-parameters (block sizes, and num_warps/num_stages on a GPU) for the fixed config.

    On a GPU, a config too big for the rank (or for fp32) is replaced by the largest listed one that fits.
    """
    if is_interpreter():
        return dict(INTERPRETER_CONFIG[kind])
    cfg = GPU_FIXED_CONFIG[kind]
    if kind in _GPU_CONFIGS and not _fits(kind, cfg, block_r, elem_bytes, flags):
        fitting = [c for c in _GPU_CONFIGS[kind] if _fits(kind, c, block_r, elem_bytes, flags)]
        cfg = max(fitting, key=lambda c: sorted(c.kwargs.values())) if fitting else _GPU_CONFIGS[kind][-1]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def autotune_configs(kind: str) -> list[triton.Config]:
    return list(_GPU_CONFIGS[kind])


def prune_by_rank(kind: str):
    """A ``prune_configs_by`` hook dropping configs whose tiles would spill (or waste Philox calls)
    for this rank, dtype and path flags."""

    def prune(configs, named_args, **kwargs):
        block_r = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
        first = next((v for v in named_args.values() if hasattr(v, "element_size")), None)
        elem_bytes = first.element_size() if first is not None else 2
        flags = {k: kwargs.get(k, named_args.get(k)) for k in ("HAS_DROPOUT", "DORA_DROPOUT", "QUANT")}
        kept = [c for c in configs if _fits(kind, c, block_r, elem_bytes, flags)]
        return kept or configs[-1:]

    return prune


def block_rank(r: int) -> int:
    """The rank padded to a power of two >= 16 (tl.dot's minimum), inside the kernel only."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def dot_fp32() -> bool:
    """Upcast tl.dot operands under the interpreter (its bf16 dot is wrong, DESIGN.md §5)."""
    return is_interpreter()


def input_precision(dtype) -> str:
    """'ieee' for fp32 unless the user enabled tf32 for matmuls (torch's own switch)."""
    import torch

    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


def target_programs(device) -> int:
    """How many programs a split-reduction launch aims for (two waves of SMs on a GPU)."""
    import torch

    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4

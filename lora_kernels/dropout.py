"""Dropout masks as a pure function of (seed, logical element index (m, k), p).

The mask of an input ``x`` viewed as M×K (M rows of K features, whatever x's strides) is defined
here once; the Triton kernels (:mod:`lora_kernels.kernels.dropout`) and the plain-PyTorch/numpy
twins below compute the same bits.

Definition (16 elements per Philox call, 8-bit thresholds)
-----------------------------------------------------------
- Group width ``G = 16``; ``KG = ceil(K / G)`` groups per row.
- Element (m, k) belongs to Philox counter ``c = m·KG + k // G`` (int64; a row's last group is
  partly unused when G does not divide K, so masks never depend on anything but (m, k) and K).
- One Philox-4x32-10 call at counter c — counter words (lo32(c), hi32(c), 0, 0), key words
  (lo32(seed), hi32(seed)), 10 rounds, the constants of Salmon et al. (SC'11) that
  ``triton.language.random`` uses — gives four 32-bit words r0..r3.
- With ``e = k % G``: word ``j = e // 4``, byte ``e % 4``; the 8-bit sample is
  ``h = (r_j >> (8·(e % 4))) & 0xFF``.
- Threshold ``t = min(round(p·256), 255)`` (Python's round, half to even); the element is kept
  iff ``h >= t``. So the effective probability is ``p_eff = t / 256`` (|p − p_eff| ≤ 2⁻⁹;
  p = 0.1 gives t = 26, p_eff = 0.1015625) and kept elements are scaled by ``1 / (1 − p_eff)``
  — :func:`keep_scale` — on every path (kernels, torch backend, reference).

Why: a whole Philox per element (``tl.rand``) costs ~65 SASS instructions per element on sm_90a
and made the shrink compute-bound; one call per 16 elements costs ~9 in all (compile-only
measurement, docs/architecture.md), within issue 13's bound of 12, which 16-bit samples (8 per
call, ~12.3) missed. FlashAttention's kernels also use 8-bit dropout thresholds. This supersedes
DESIGN.md's earlier "tl.rand per element" mask.

Because the generator is counter based, forward and backward regenerate the same mask from the
seed, so neither the mask nor the masked copy of x is ever stored. Seeds are integers in
``[0, 2**63)``.
"""
from __future__ import annotations

import numpy as np
import torch

SEED_MAX = 2**63 - 1
GROUP = 16  # elements per Philox call (4 words × 4 bytes)
THRESHOLD_BITS = 8

# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
# the same numbers Triton uses in ``triton.language.random``.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")


def dropout_threshold(p: float) -> int:
    """The 8-bit threshold t = min(round(p·256), 255): an element is kept iff its sample >= t."""
    _check_p(p)
    return min(round(p * 256), 255)


def effective_p(p: float) -> float:
    """p_eff = t/256, the probability the mask really drops with (t = :func:`dropout_threshold`)."""
    return dropout_threshold(p) / 256.0


def keep_scale(p: float) -> float:
    """1/(1 − p_eff): the multiplier of kept elements, used by every path."""
    return 1.0 / (1.0 - effective_p(p))


def seed_halves(seed: int) -> tuple[int, int]:
    """(lo32, hi32) of the seed as *signed* int32 values (the same bit patterns).

    The kernels take the seed as two int32 arguments that are never specialised, so a new seed
    never recompiles a kernel (an int64 argument would be typed i32 or i64 by its magnitude).
    """
    _check_seed(seed)
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    return (lo - 2**32 if lo >= 2**31 else lo), (hi - 2**32 if hi >= 2**31 else hi)


def _philox_torch(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 in int64 torch ops (any device); returns the four words as int64 in [0, 2**32).

    The 32×32→64-bit products are int64 multiplications that wrap modulo 2**64, as PyTorch's
    integer kernels do on every device; the low 64 bits of the product, hence both 32-bit halves,
    are exact.
    """
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        prod_b = c2 * _PHILOX_ROUND_B  # < 2**64: wraps in int64, low 64 bits exact
        prod_a = c0 * _PHILOX_ROUND_A
        c0 = ((prod_b >> 32) & _MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = ((prod_a >> 32) & _MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = prod_b.bitwise_and_(_MASK32)
        c3 = prod_a.bitwise_and_(_MASK32)
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _philox_numpy(seed: int, counters: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same in numpy uint32/uint64 (well-defined unsigned wrap-around): faster than int64
    torch ops on a CPU, which matters for the torch backend's dropout there."""
    off = counters.astype(np.uint64)
    c0 = off.astype(np.uint32)
    c1 = (off >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    round_a, round_b, shift = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B), np.uint64(32)
    for _ in range(_N_ROUNDS):
        prod_b = c2.astype(np.uint64) * round_b
        prod_a = c0.astype(np.uint64) * round_a
        c0 = (prod_b >> shift).astype(np.uint32)
        c0 ^= c1
        c0 ^= np.uint32(k0)
        c2 = (prod_a >> shift).astype(np.uint32)
        c2 ^= c3
        c2 ^= np.uint32(k1)
        c1 = prod_b.astype(np.uint32)
        c3 = prod_a.astype(np.uint32)
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox4x32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four 32-bit words of Philox-4x32-10 at int64 ``counters``: int64 tensor of shape
    ``counters.shape + (4,)`` with values in [0, 2**32).

    Counter words (lo32, hi32, 0, 0), key (lo32(seed), hi32(seed)): what
    ``triton.language.randint4x(seed, counters)`` returns. CPU tensors go through numpy, other
    devices through torch ops; tests/test_dropout.py checks both against a Triton kernel.
    """
    _check_seed(seed)
    counters = counters.to(torch.int64)
    if counters.device.type == "cpu":
        words = _philox_numpy(seed, counters.numpy())
        return torch.from_numpy(np.stack(words, axis=-1).astype(np.int64))
    return torch.stack(_philox_torch(seed, counters), dim=-1)


def mask_samples(seed: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """The 8-bit samples h (int32, rows×cols) of the definition above."""
    _check_seed(seed)
    kg = -(-cols // GROUP)
    if rows * kg == 0:
        return torch.zeros((rows, cols), dtype=torch.int32, device=device)
    counters = torch.arange(rows * kg, dtype=torch.int64, device=device)
    if counters.device.type == "cpu":
        words = np.stack(_philox_numpy(seed, counters.numpy()), axis=-1)  # (rows·kg, 4) uint32
        samples = np.stack([(words >> np.uint32(8 * b)) & np.uint32(0xFF) for b in range(4)], axis=-1)  # (.., 4, 4)
        return torch.from_numpy(samples.reshape(rows, kg * GROUP)[:, :cols].astype(np.int32))
    words = torch.stack(_philox_torch(seed, counters), dim=-1)  # (rows·kg, 4) int64
    samples = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1)
    return samples.reshape(rows, kg * GROUP)[:, :cols].to(torch.int32)


def keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (rows, cols): element (m, k) is kept iff its sample h >= t."""
    return mask_samples(seed, rows, cols, device) >= dropout_threshold(p)


def dropout_mask(seed: int, rows: int, cols: int, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The dropout multiplier Z (rows×cols): 1/(1 − p_eff) where kept, 0 where dropped."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=dtype, device=device)
    keep = keep_mask(seed, rows, cols, p, device)
    return keep.to(dtype) * keep_scale(p)


def apply_dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x ⊙ Z for a 2-D x (M×K), Z regenerated from the seed. Returns x itself when p == 0.

    A product, like ``nn.Dropout``: a NaN or inf in a dropped position still propagates.
    """
    if p == 0.0:
        return x2d
    return x2d * dropout_mask(seed, x2d.shape[0], x2d.shape[1], p, dtype=x2d.dtype, device=x2d.device)


SEED_DRAW_HIGH = 2**62  # seeds drawn for seed=None are in [0, 2**62)


def draw_seed_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh seed as a 1-element int64 CPU tensor, drawn from torch's (CPU) generator.

    This is how ``lora_linear`` / ``dora_linear`` draw the seed when ``seed=None``: the tensor goes
    into the custom op as is (the op reads its value), so ``torch.compile`` traces the draw as an
    ordinary ``randint`` node, without the graph break a ``.item()`` in traced code would cause.
    Drawing from the CPU generator keeps runs reproducible under ``torch.manual_seed`` and makes
    ``torch.utils.checkpoint`` (which restores the CPU RNG state before recomputing) re-draw the
    same seed, hence the same mask, in the recomputed forward.
    """
    return torch.randint(0, SEED_DRAW_HIGH, (1,), generator=generator, dtype=torch.int64)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's (CPU) generator, so runs are reproducible under torch.manual_seed.

    The same value as :func:`draw_seed_tensor` would draw (as a Python int; not for traced code).
    """
    return int(draw_seed_tensor(generator).item())

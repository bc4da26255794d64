"""Dropout masks as a pure function of (seed, flat element index, p).

The mask for an input ``x`` viewed as M×K is decided element by element from the *logical* flat
index ``i = m·K + k`` (independent of x's strides and of kernel block sizes) with Triton's Philox
counter-based generator (``tl.rand(seed, i)``, 10 rounds, 64-bit offsets). An element is kept when
``u >= p`` where ``u`` is that uniform float32 sample; kept elements are scaled by ``1/(1-p)``.

Because the generator is counter based, forward and backward regenerate the same mask from the
seed, so neither the mask nor the masked copy of x is ever stored. ``philox_uniform`` below is a
plain-PyTorch twin of ``tl.rand`` that gives the same float32 samples bit for bit on any device;
the Triton side lives in :mod:`lora_kernels.kernels.dropout`.

Seeds are integers in ``[0, 2**63)``.
"""
from __future__ import annotations

import torch

SEED_MAX = 2**63 - 1

# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
# the same numbers Triton uses in ``triton.language.random``.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# Triton's uint32 -> uniform float conversion: the largest scale such that INT32_MAX*scale < 1.
_UINT_TO_UNIFORM_SCALE = 4.6566127342e-10


def _mul_wide(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high 32 bits, low 32 bits) of a·b for a uint32 tensor (held in int64) and a uint32 constant.

    Split ``b`` in 16-bit halves so every intermediate fits in int64 without overflow.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2**48
    hi_part = a * b_hi  # < 2**48
    mid = ((hi_part & 0xFFFF) << 16) + lo_part  # < 2**49
    low = mid & _MASK32
    high = (hi_part >> 16) + (mid >> 32)
    return high & _MASK32, low


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First 32-bit output of Philox-4x32-10 for counters ``offsets`` (int64), as int64 in [0, 2**32).

    Mirrors ``triton.language.randint(seed, offsets)`` for int64 ``offsets``: counter
    (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)).
    """
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_wide(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_wide(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 samples in [0, 1), bit-identical to ``triton.language.rand(seed, offsets)``."""
    r = philox_randint(seed, offsets)
    # Triton bitcasts to int32 and folds negatives with ~x (= -x-1, i.e. 2**32-1-r for r >= 2**31).
    folded = torch.where(r >= 2**31, _MASK32 - r, r)
    scale = torch.tensor(_UINT_TO_UNIFORM_SCALE, dtype=torch.float32, device=r.device)
    return folded.to(torch.float32) * scale


def keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (rows, cols): element (m, k) is kept iff its sample u >= p."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    u = philox_uniform(seed, idx)
    return u >= torch.tensor(p, dtype=torch.float32, device=u.device)


def dropout_mask(seed: int, rows: int, cols: int, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The dropout multiplier Z (rows×cols): 1/(1-p) where kept, 0 where dropped."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=dtype, device=device)
    keep = keep_mask(seed, rows, cols, p, device)
    return keep.to(dtype) * (1.0 / (1.0 - p))


def apply_dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x ⊙ Z for a 2-D x (M×K), Z regenerated from the seed. Returns x itself when p == 0.

    A product, like ``nn.Dropout``: a NaN or inf in a dropped position still propagates.
    """
    if p == 0.0:
        return x2d
    return x2d * dropout_mask(seed, x2d.shape[0], x2d.shape[1], p, dtype=x2d.dtype, device=x2d.device)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's (CPU) generator, so runs are reproducible under torch.manual_seed."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64).item())

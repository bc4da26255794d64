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

import numpy as np
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


def _philox_torch(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Philox-4x32-10 in int64 torch ops (any device); returns int64 values in [0, 2**32).

    The 32×32→64-bit products are int64 multiplications that wrap modulo 2**64, as PyTorch's
    integer kernels do on every device; the low 64 bits of the product, hence both 32-bit halves,
    are exact.
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
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
    return c0


def _philox_numpy(seed: int, offsets: np.ndarray) -> np.ndarray:
    """The same in numpy uint32/uint64 (well-defined unsigned wrap-around): ~5× faster than int64
    torch ops on a CPU, which matters for the torch backend's dropout there."""
    off = offsets.astype(np.uint64)
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
    return c0


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First 32-bit output of Philox-4x32-10 for counters ``offsets`` (int64), as int64 in [0, 2**32).

    Mirrors ``triton.language.randint(seed, offsets)`` for int64 ``offsets``: counter
    (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)). CPU tensors go through numpy,
    other devices through torch ops; tests/test_dropout.py checks both against tl.rand bit for bit.
    """
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    offsets = offsets.to(torch.int64)
    if offsets.device.type == "cpu":
        return torch.from_numpy(_philox_numpy(seed, offsets.numpy()).astype(np.int64))
    return _philox_torch(seed, offsets)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 samples in [0, 1), bit-identical to ``triton.language.rand(seed, offsets)``."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    offsets = offsets.to(torch.int64)
    if offsets.device.type == "cpu":
        r = _philox_numpy(seed, offsets.numpy())
        # Triton bitcasts to int32 and folds negatives with ~x (= 2**32-1-r for r >= 2**31)
        folded = np.where(r >= np.uint32(2**31), ~r, r)
        return torch.from_numpy(folded.astype(np.float32) * np.float32(_UINT_TO_UNIFORM_SCALE))
    r = _philox_torch(seed, offsets)
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

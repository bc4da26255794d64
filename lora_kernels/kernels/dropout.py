"""In-register dropout for the Triton kernels: the twin of :mod:`lora_kernels.dropout`.

One Philox-4x32-10 call per 16 consecutive elements of a row (counter m·KG + k//16,
KG = ceil(K/16)), 8-bit samples, kept iff sample >= t (the definition, its effective p and
keep-scale are in :mod:`lora_kernels.dropout`). The kernels only need the keep *bits*: they
multiply x (or the LoRA term) by the 0/1 bits (a product, so NaN propagates) and apply the
keep-scale 1/(1 − p_eff) once, as a scalar.

The seed arrives as two int32 kernel arguments (its low and high 32-bit words, bit patterns),
which the kernels list in ``do_not_specialize``: a new seed never recompiles a kernel.
"""
import triton
import triton.language as tl
from triton.language.random import philox_impl


@triton.jit
def philox_words(seed_lo, seed_hi, counter):
    """The four uint32 Philox-4x32-10 words at int64 ``counter`` (a block), key (seed_lo, seed_hi)."""
    c0 = counter.to(tl.uint32)  # truncates: low 32 bits
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    return philox_impl(c0, c1, zero, zero, k0, k1)


@triton.jit
def keep_tile(seed_lo, seed_hi, threshold, offs_m, k_start, k_groups,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep bits (int1, BLOCK_M×BLOCK_K) of rows ``offs_m`` (int64) and columns k_start + [0, BLOCK_K).

    ``k_start`` and BLOCK_K must be multiples of 16; ``k_groups`` = ceil(K/16); ``threshold`` = t
    (int32 in [0, 255]).
    """
    g = k_start // 16 + tl.arange(0, BLOCK_K // 16)
    counter = offs_m[:, None] * k_groups + g[None, :]
    r0, r1, r2, r3 = philox_words(seed_lo, seed_hi, counter)
    # words[..., i, a] = r_(2i+a)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    # byte b of a word >= t  <=>  (word << (24 - 8b)) >= (t << 24) as uint32
    t = threshold.to(tl.uint32) << 24
    # keep[..., i, a, bi, ba]: byte 2·bi + ba of word 2i + a, i.e. element 16g + 4j + b
    keep = tl.join(tl.join((words << 24) >= t, (words << 8) >= t), tl.join((words << 16) >= t, words >= t))
    return tl.reshape(keep, (BLOCK_M, BLOCK_K))


@triton.jit
def apply_keep(x, keep, DOT_FP32: tl.constexpr):
    """x ⊙ keep as a product, like ``nn.Dropout``: a NaN or inf in a dropped position gives NaN.

    Under the interpreter (DOT_FP32) x is upcast first: its bf16 arithmetic is not IEEE."""
    if DOT_FP32:
        x = x.to(tl.float32)
    return x * keep.to(x.dtype)


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation.

    ``DOT_FP32`` upcasts the operands first: the Triton interpreter's bf16 ``tl.dot`` is wrong
    (DESIGN.md §5), so interpreter runs set it; GPU runs keep native fp16/bf16 tensor-core dots.
    ``INPUT_PRECISION`` only matters for fp32 operands ("ieee" unless tf32 was asked for).
    """
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

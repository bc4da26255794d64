"""In-register dropout for the Triton kernels: the twin of :mod:`lora_kernels.dropout`.

Element (m, k) of the logical M×K input is kept iff ``tl.rand(seed, m·K + k) >= p``; its
multiplier is then 1/(1-p), else 0. ``lora_kernels.dropout.philox_uniform`` reproduces ``tl.rand``
bit for bit, so the kernels and the PyTorch paths agree on every mask bit.
"""
import triton
import triton.language as tl


@triton.jit
def dropout_multiplier(seed, flat_index, dropout_p, keep_scale):
    """Z at ``flat_index`` (int64 block): ``keep_scale`` (= 1/(1-p)) where kept, 0.0 where dropped."""
    u = tl.rand(seed, flat_index)  # float32, bit-identical to lora_kernels.dropout.philox_uniform
    return tl.where(u >= dropout_p, keep_scale, 0.0)  # p and 1/(1-p) arrive as fp32 scalars


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

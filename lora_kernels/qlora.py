"""LoRA / DoRA on a 4-bit frozen weight (QLoRA): ``lora_linear`` / ``dora_linear`` with a
:class:`lora_kernels.quant.QuantizedWeight` as ``weight`` come here (one dispatch line in
:mod:`lora_kernels.functional`).

The maths is exactly that of the dense functions on the dequantised weight W = deq(Q) in x's
(compute) dtype, on every backend:

- ``torch``: W is dequantised by the plain-PyTorch dequantiser (into the scratch buffer below),
  then the torch backend runs;
- ``fused`` (Triton): no dequantised W at all. The forward GEMM (x·Wᵀ + LoRA epilogue), the backward
  dx GEMM (g·W + mask-aware LoRA epilogue) and DoRA's row norm decode each W tile in registers from
  the packed 4-bit bytes inside their K / N loops (:func:`lora_kernels.kernels.dequant.load_w4`,
  bitwise equal to the reference dequantiser in x's dtype); nothing N×K is allocated;
- ``hybrid`` (Triton + cuBLAS): W is dequantised by the Triton kernel
  (:mod:`lora_kernels.kernels.dequant`) into the scratch buffer, then cuBLAS GEMMs + the Triton LoRA
  kernels run with W as their weight.

The scratch buffer (torch and hybrid) is shared by all layers of a (device, dtype, CUDA stream) and
reused from call to call; it is never saved for backward: the backward dequantises again (one more
pass over the 4-bit weight, about a quarter of the bytes of a bf16 weight read). Keyed by the
current CUDA stream, so layers running on different streams never share one; two *threads* on
one stream (or on a CPU) must not run 4-bit layers concurrently on the scratch paths (each call
fills the buffer, then consumes it, in stream order). The fused path has no scratch and no such limit.
Saved for backward: x, A, B, u (and DoRA's m, h, n), as for a dense weight; nothing N×K. There is no
gradient for the 4-bit weight (it is frozen by construction).
"""
from __future__ import annotations

import functools
import sys

import torch

from .quant.dequantize import dequantize as _dequantize_torch
from .quant.format import QuantizedWeight

_SCRATCH: dict[tuple, torch.Tensor] = {}

# torch.compile: the 4-bit entry points are not registered as torch.library custom ops (their
# autograd Functions take a QuantizedWeight and launch Triton directly), so Dynamo must not trace them:
# they are compiler-disabled (_eager_only). Under torch.compile a 4-bit layer is a graph break and runs
# eagerly, with the same results, in every case. The error of fullgraph=True names COMPILE_REASON once
# the disabled functions are built (prepare_for_compile): when torch._dynamo was already imported at
# ``import lora_kernels``, when a QuantLinear / QLoRALinear is constructed or a PEFT Linear4bit is
# converted, or after any eager call of a 4-bit entry point. Only a fullgraph compile of a bare
# functional call in a process that did none of these fails with Dynamo's own message instead
# ("function marked as skipped": torch.compiler.disable), still refusing the graph.
COMPILE_REASON = ("lora_kernels: LoRA/DoRA on a 4-bit QuantizedWeight runs eagerly under torch.compile (a graph "
                  "break): its kernels are not registered as custom ops; fullgraph=True cannot include it")

_EAGER_ONLY: list = []  # each _eager_only wrapper's builder, for prepare_for_compile


def _eager_only(fn):
    """``torch.compiler.disable(fn)``, built by :func:`prepare_for_compile` (or at the first call)
    rather than at import: building it imports torch._dynamo, which imports triton.language, and a CPU
    program that switches the Triton interpreter on after ``import lora_kernels`` (the CLI) would then
    get compiled-mode stdlib helpers (DESIGN.md §5). Dynamo traces the wrapper and breaks the graph at
    the disabled function's call, with COMPILE_REASON (tests/test_qlora_fused.py)."""

    disabled = None

    def build():
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn, reason=COMPILE_REASON)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if disabled is None:
            prepare_for_compile()  # all of them, not only this one
        return disabled(*args, **kwargs)

    _EAGER_ONLY.append(build)
    return call


def prepare_for_compile() -> None:
    """Build the compiler-disabled 4-bit entry points now (imports torch._dynamo), so that a later
    ``torch.compile(..., fullgraph=True)`` names COMPILE_REASON. Called by the 4-bit layers'
    constructors and the PEFT Linear4bit conversion (a model is built before it is compiled)."""
    for build in _EAGER_ONLY:
        build()


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements for (device, dtype, current CUDA stream), grown when
    needed, reused.

    Always a normal tensor, also when first needed under ``torch.inference_mode`` (it is allocated with
    inference mode off): a normal tensor may be written in place inside inference mode, while an
    inference tensor could never be written (or used in an autograd-recorded op) outside it, so one
    buffer serves inference-first and training-first programs alike."""
    device = torch.device(device)
    key = (device, dtype, _stream_key(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the smaller one first
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Free the scratch buffers (e.g. before merging or after training)."""
    _SCRATCH.clear()


def fused_decodes(impl: str, dtype: torch.dtype) -> bool:
    """Whether the kernels of ``impl`` decode the 4-bit weight themselves (the fused path)."""
    return impl == "fused" and dtype in (torch.float16, torch.bfloat16, torch.float32)


def weight_for(qw: QuantizedWeight, dtype: torch.dtype, impl: str):
    """What the backend gets as its weight: ``qw`` itself on the fused path (decoded in the GEMMs),
    else W dequantised into the scratch buffer."""
    return qw if fused_decodes(impl, dtype) else dequantize_weight(qw, dtype, impl)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """W (N, K) in ``dtype``, in the scratch buffer: the Triton kernel for a Triton path, else torch."""
    out = scratch_buffer(qw.numel(), dtype, qw.device).view(qw.shape)
    if impl == "torch" or dtype == torch.float64:
        return _dequantize_torch(qw, dtype, out=out)
    from .kernels.dequant import dequant_4bit

    return dequant_4bit(qw, out)


# A 4-bit weight on CUDA: the fused path up to this many tokens (M rows of x), hybrid above. From the
# QLoRA compile-level model (lora_kernels/perf/qlora_model.py; docs/qlora.md), H200, realistic
# efficiencies, Llama-3-8B projections, r = 16, p = 0: decoding costs the fused GEMMs ~21-23 SASS
# instructions per W element per M block (forward 128 rows, dx 64 rows), so from M = 128-256 on they are
# issue-bound (about 3.7-3.9x the bf16 base at M = 8192, against hybrid's 1.17-1.8x); at M = 64 the
# fused path's single read of the 4-bit W beats hybrid's dequantise-to-scratch pass on every projection
# (q/o 68 vs 94 µs, k/v 48 vs 59). These figures are modeled, not measured.
QLORA_FUSED_MAX_TOKENS = 64


def choose_qlora_path(m: int, device: torch.device) -> str:
    """Fused or hybrid for a 4-bit weight (the rule ``triton`` and ``auto`` use; see QLORA_FUSED_MAX_TOKENS).
    Off CUDA (the interpreter) the fused path, as for a dense weight."""
    if torch.device(device).type != "cuda":
        return "fused"
    return "fused" if m <= QLORA_FUSED_MAX_TOKENS else "hybrid"


def _resolve(backend, x2d, qw, r):
    """resolve_backend, with the 4-bit rule replacing the dense one where a Triton path is picked by rule."""
    from .backends import requested_backend, resolve_backend

    impl = resolve_backend(backend, x2d, qw.shape[0], r)
    if impl in ("fused", "hybrid") and requested_backend(backend) in ("auto", "triton"):
        impl = choose_qlora_path(x2d.shape[0], x2d.device)
    return impl


def _backend(impl):
    from .functions import _backend_module

    return _backend_module(impl)


def _check_quantized(qw: QuantizedWeight, x: torch.Tensor) -> None:
    if qw.device != x.device:
        raise ValueError(f"weight (4-bit) is on {qw.device}, x on {x.device}: one device expected")


def _prepare(x, qw, lora_a, lora_b, bias, scale, dropout_p, seed, training):
    """functional's validation and seed handling, with a stride-0 stand-in for the 4-bit weight (it
    carries only the shape, x's dtype and device: nothing N×K is allocated)."""
    from . import functional

    x, _, lora_a, lora_b, bias = functional._autocast(x, None, lora_a, lora_b, bias)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_quantized(qw, x)
    stand_in = x.new_empty(()).expand(*qw.shape)
    return functional._prepare(x, stand_in, lora_a, lora_b, bias, scale, dropout_p, seed, training)


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qw, bias, lora_a, lora_b, scale, dropout_p, seed, impl, seed_tensor):
        from .functions import _autocast_off, _seed_value

        module, kw = _backend(impl)
        seed = _seed_value(seed, seed_tensor)
        with _autocast_off(x.device):
            w = weight_for(qw, x.dtype, impl)
            y, u = module.lora_linear_fwd(x, w, bias, lora_a, lora_b, scale, dropout_p, seed, **kw)
        ctx.save_for_backward(x, lora_a, lora_b, u)
        ctx.qw, ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = qw, scale, dropout_p, seed, impl
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .functions import _autocast_off

        x, lora_a, lora_b, u = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_a = grad_b = grad_bias = None
        with _autocast_off(grad_y.device):
            if need_x or need_a or need_b:
                module, kw = _backend(ctx.impl)
                # the torch backend reads W only for dx; the Triton launchers take its strides always
                w = weight_for(ctx.qw, x.dtype, ctx.impl) if (need_x or ctx.impl != "torch") else None
                dx, da, db = module.lora_linear_bwd(grad_y.contiguous(), x, w, lora_a, lora_b, u, ctx.scale,
                                                    ctx.dropout_p, ctx.seed, need_x, **kw)
                grad_x, grad_a, grad_b = (dx if need_x else None), (da if need_a else None), (db if need_b else None)
            if need_bias:
                grad_bias = grad_y.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None


class _QDoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qw, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl, seed_tensor):
        from .functions import _autocast_off, _seed_value

        module, kw = _backend(impl)
        seed = _seed_value(seed, seed_tensor)
        with _autocast_off(x.device):
            w = weight_for(qw, x.dtype, impl)
            y, u, h, norm = module.dora_linear_fwd(x, w, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed,
                                                   **kw)
        ctx.save_for_backward(x, lora_a, lora_b, magnitude, u, h, norm)
        ctx.qw, ctx.scale, ctx.dropout_p, ctx.seed, ctx.impl = qw, scale, dropout_p, seed, impl
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .functions import _autocast_off

        x, lora_a, lora_b, magnitude, u, h, norm = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        grad_x = grad_a = grad_b = grad_m = grad_bias = None
        with _autocast_off(grad_y.device):
            if need_x or need_a or need_b or need_m:
                module, kw = _backend(ctx.impl)
                # the dense backward reads W even without dx (dropout's dx term); dequantise it again
                w = weight_for(ctx.qw, x.dtype, ctx.impl)
                dx, da, db, dm = module.dora_linear_bwd(grad_y.contiguous(), x, w, lora_a, lora_b, magnitude, u, h,
                                                        norm, ctx.scale, ctx.dropout_p, ctx.seed, need_x, **kw)
                grad_x, grad_a, grad_b = (dx if need_x else None), (da if need_a else None), (db if need_b else None)
                grad_m = dm if need_m else None
            if need_bias:
                grad_bias = grad_y.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


@_eager_only
def lora_linear(x, weight: QuantizedWeight, lora_a, lora_b, scale, bias=None, dropout_p=0.0, seed=None,
                training=True, backend=None):
    """:func:`lora_kernels.lora_linear` for a 4-bit ``weight`` (same arguments and result)."""

    x2d, _, lora_a, lora_b, bias, scale, dropout_p, seed, seed_tensor = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = _resolve(backend, x2d, weight, lora_a.shape[0])
    y = _QLoraLinear.apply(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl, seed_tensor)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_eager_only
def dora_linear(x, weight: QuantizedWeight, lora_a, lora_b, magnitude, scale, bias=None, dropout_p=0.0, seed=None,
                training=True, backend=None):
    """:func:`lora_kernels.dora_linear` for a 4-bit ``weight`` (same arguments and result)."""
    from ._validation import check_tensor

    check_tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},) (one per output row of the 4-bit weight "
                         f"{tuple(weight.shape)}), got {tuple(magnitude.shape)}")
    if magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, weight on {weight.device}: one device expected")
    x2d, _, lora_a, lora_b, bias, scale, dropout_p, seed, seed_tensor = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = _resolve(backend, x2d, weight, lora_a.shape[0])
    y = _QDoraLinear.apply(x2d, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl, seed_tensor)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _QLinear(torch.autograd.Function):
    """y = x·deq(Q)ᵀ + b with dx = g·deq(Q): the frozen 4-bit layer alone (W never saved)."""

    @staticmethod
    def forward(ctx, x, qw, bias, impl):
        from .functions import _autocast_off

        with _autocast_off(x.device):
            w = dequantize_weight(qw, x.dtype, impl)
            y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
        ctx.qw, ctx.impl, ctx.dtype = qw, impl, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_weight(ctx.qw, ctx.dtype, ctx.impl)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, None, grad_bias, None


@_eager_only
def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """F.linear with a 4-bit weight, computed in x's dtype (W dequantised into the scratch buffer and
    again in backward, never saved)."""
    from .backends import resolve_backend

    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the 4-bit weight's in_features "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    _check_quantized(weight, x)
    from .functional import _autocast

    x, _, _, _, bias = _autocast(x, None, None, None, bias)  # as F.linear under torch.autocast
    x2d = x.reshape(-1, x.shape[-1])
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    impl = resolve_backend(backend, x2d, weight.shape[0], 1)
    if impl == "fused":  # there is no Triton GEMM without an adapter: cuBLAS on the dequantised weight
        impl = "hybrid"
    return _QLinear.apply(x2d, weight, bias, impl).reshape(*x.shape[:-1], weight.shape[0])


if "torch._dynamo" in sys.modules:  # already imported (so is triton.language): building now changes nothing
    prepare_for_compile()

"""The layer bench's 4-bit (QLoRA) providers, all on the SAME 4-bit frozen weight of a shape whose
``quant`` is 'nf4' or 'fp4' (blocksize 64, double-quantised absmax, as bitsandbytes' and PEFT's
QLoRA default):

    bnb4-base     bitsandbytes' ``Linear4bit`` alone, no LoRA: the 4-bit frozen floor
    peft-qlora    PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``: bitsandbytes' 4-bit base,
                  then its LoRA branch unfused, the dropped-out copy of x saved for backward)
    qlora-torch   lora_kernels' ``lora_linear`` / ``dora_linear`` with the :class:`QuantizedWeight`,
    qlora-fused   backend torch / fused / hybrid (the public functional API: whatever each backend
    qlora-hybrid  does with a 4-bit weight is what is measured)

The weight is quantised once per shape by bitsandbytes when it is installed (``Params4bit``); our
providers wrap that ``Params4bit`` with :func:`lora_kernels.quant.from_bnb`, which shares its storage.
Without bitsandbytes, lora_kernels' own quantiser (equal bytes) makes the weight, our providers run
and the two bitsandbytes-based ones report "unavailable: bitsandbytes not installed".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton_env import HAS_TRITON, is_interpreter
from ..functional import dora_linear, lora_linear
from ..quant import QUANT_TYPES, QuantizedWeight, from_bnb, quantize
from .providers import SEED, Provider, Unavailable, peft_one_layer
from .shapes import Shape

BLOCKSIZE = 64
COMPRESS_STATISTICS = True  # bitsandbytes' Linear4bit default (and PEFT QLoRA recipes'): nested absmax


@dataclass
class QuantProblem:
    qweight: QuantizedWeight
    bnb_weight: object | None  # the bitsandbytes Params4bit qweight shares storage with; None without bitsandbytes
    quantiser: str  # "bitsandbytes" | "lora_kernels"


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise Unavailable("unavailable: bitsandbytes not installed") from exc
    return bitsandbytes


def quantize_weight(w: torch.Tensor, quant_type: str) -> QuantProblem:
    """The shape's 4-bit weight, quantised from ``w`` (N, K) in its dtype (the compute dtype)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant: {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    try:
        bnb = _bnb()
    except Unavailable:
        qw = quantize(w, quant_type, BLOCKSIZE, compress_statistics=COMPRESS_STATISTICS)
        return QuantProblem(qw, None, "lora_kernels")
    param = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type=quant_type, blocksize=BLOCKSIZE,
                              compress_statistics=COMPRESS_STATISTICS).to(w.device)  # quantises
    return QuantProblem(from_bnb(param), param, "bitsandbytes")


def _bnb_linear(shape: Shape, problem) -> torch.nn.Module:
    """bitsandbytes' Linear4bit on the problem's Params4bit and bias (shared, not copied)."""
    bnb = _bnb()
    quant = problem.quant
    if problem[0].device.type == "cpu" and shape.k % 16 == 0 and shape.k % BLOCKSIZE:
        # tests/test_quant_bnb.py::test_bnb_cpu_kernel_straddling_bug_is_where_we_say pins this down
        raise Unavailable(f"unavailable: bitsandbytes' CPU dequantiser mis-scales 4-bit blocks that straddle two "
                          f"rows when in_features ({shape.k}) is a multiple of 16 but not of the blocksize "
                          f"({BLOCKSIZE}); use in_features a multiple of {BLOCKSIZE} on CPU")
    if quant.bnb_weight is None:  # bitsandbytes was installed after the problem was made: not the same weight
        raise Unavailable("unavailable: the 4-bit weight was not made by bitsandbytes")
    x, bias = problem[0], problem[2]
    layer = bnb.nn.Linear4bit(shape.k, shape.n, bias=True, compute_dtype=x.dtype, quant_type=shape.quant,
                              compress_statistics=COMPRESS_STATISTICS, device="meta")
    layer.weight = quant.bnb_weight
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.train()  # in eval mode bitsandbytes may repack the weight for its CPU kernel


def _quant_tensors(problem) -> list:
    return list(problem.quant.qweight.tensors().values())


def _peft_qlora(shape: Shape, problem, scale: float) -> Provider:
    try:
        import peft  # noqa: F401  (installed? peft_one_layer uses it)
    except ImportError as exc:
        raise Unavailable("peft is not installed") from exc
    base = _bnb_linear(shape, problem)
    x, _, _, a, b, _, mag = problem

    class _One(torch.nn.Module):
        is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then picks its bnb layer

        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, inp):
            return self.proj(inp)

    model, layer, params = peft_one_layer(_One(), shape, scale, shape.dropout_p, x, a, b, mag)
    if not any(c.__name__ == "Linear4bit" and "bnb" in c.__module__ for c in type(layer).__mro__):
        raise RuntimeError(f"PEFT wrapped the 4-bit layer in {type(layer).__module__}.{type(layer).__name__}, "
                           "not its bitsandbytes QLoRA class")
    names = ["dx", "dA", "dB", "dm"] if shape.dora else ["dx", "dA", "dB"]
    return Provider(lambda: layer(x), params, names, owned=list(model.parameters()) + _quant_tensors(problem))


def quant_provider_fn(provider: str, shape: Shape, problem, scale: float) -> Provider:
    """The 4-bit provider's callable (see the module docstring); raises Unavailable when it cannot run."""
    x, _, bias, a, b, _, mag = problem
    if provider == "bnb4-base":
        layer = _bnb_linear(shape, problem)
        return Provider(lambda: layer(x), [x], ["dx"], owned=_quant_tensors(problem))
    if provider == "peft-qlora":
        return _peft_qlora(shape, problem, scale)
    backend = provider.removeprefix("qlora-")
    if backend in ("fused", "hybrid"):
        if not HAS_TRITON:
            raise Unavailable("Triton is not installed")
        if x.device.type != "cuda" and not is_interpreter():
            raise Unavailable("the Triton paths need a GPU or TRITON_INTERPRET=1")
    qw, p = problem.quant.qweight, shape.dropout_p
    if shape.dora:
        return Provider(lambda: dora_linear(x, qw, a, b, mag, scale, bias=bias, dropout_p=p, seed=SEED, backend=backend),
                        [x, a, b, mag], ["dx", "dA", "dB", "dm"], owned=_quant_tensors(problem))
    return Provider(lambda: lora_linear(x, qw, a, b, scale, bias=bias, dropout_p=p, seed=SEED, backend=backend),
                    [x, a, b], ["dx", "dA", "dB"], owned=_quant_tensors(problem))

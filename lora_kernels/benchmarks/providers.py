"""The layer bench's providers: the problem (random inputs of a :class:`~.shapes.Shape`) and, per
provider, a zero-argument callable computing y with the tensors to differentiate.

    base     F.linear(x, W, b) alone: the frozen layer, the physical floor (forward; dx in backward)
    unfused  the strongest eager path: cuBLAS x·Wᵀ + b, F.dropout, then
             y.addmm_((drop(x)·Aᵀ), Bᵀ, alpha=s) in place; LoRA only (for DoRA the eager baselines
             are PEFT's layer and the compiled reference)
    peft     PEFT's lora.Linear (use_dora for DoRA shapes), when peft is installed
    compile  torch.compile of the reference's formula (lora_kernels.reference), with the mask drawn by
             F.dropout: compiling the reference's int64 Philox twin kept Inductor busy for over ten
             minutes on CPU (torch 2.13), and a compiled model would use torch's own dropout anyway
    torch    lora_kernels, torch backend
    fused    lora_kernels, Triton fused path
    hybrid   lora_kernels, Triton hybrid path (cuBLAS GEMMs + Triton LoRA kernels)

On a 4-bit shape (``Shape.quant`` = 'nf4' | 'fp4') the weight is quantised once and every provider
uses it (:mod:`.quant_providers`: ``bnb4-base``, ``peft-qlora``, ``qlora-torch``, ``qlora-fused``,
``qlora-hybrid``); ``base`` runs there too, on the dequantised weight in the shape's dtype (the dense
floor), and the other dense providers do not apply. The 4-bit providers do not apply to dense shapes.

Our providers and ``base`` are validated at the shape's dropout rate (same seeded mask as the
reference); ``unfused``, ``peft`` and ``compile`` draw their own masks, so they are validated with
dropout off (:mod:`.validation`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._triton_env import HAS_TRITON, is_interpreter
from ..functional import dora_linear, lora_linear
from ..reference import dora_weight_norm_ref
from .shapes import Shape


DENSE_PROVIDERS = ("base", "unfused", "peft", "compile", "torch", "fused", "hybrid")
QUANT_PROVIDERS = ("bnb4-base", "peft-qlora", "qlora-torch", "qlora-fused", "qlora-hybrid")  # 4-bit shapes
PROVIDERS = DENSE_PROVIDERS + QUANT_PROVIDERS
OUR_PROVIDERS = ("torch", "fused", "hybrid")
OUR_QUANT_PROVIDERS = ("qlora-torch", "qlora-fused", "qlora-hybrid")
BASELINES = ("unfused", "peft", "compile", "peft-qlora")  # what users run today
FLOORS = ("base", "bnb4-base")  # the frozen layer alone: y = x·Wᵀ + b, dx only
THEIRS = BASELINES + ("bnb4-base",)  # a failure to build or run one of these is a skip, not our failure
SAME_MASK_PROVIDERS = FLOORS + OUR_PROVIDERS + OUR_QUANT_PROVIDERS  # validated at the shape's dropout rate


SEED = 1234
SCALE = 2.0


INTERPRETED_PROVIDERS = ("fused", "hybrid", "qlora-fused", "qlora-hybrid")  # Triton's interpreter without a GPU


DEFAULT_GPU_PROVIDERS = ("base", "unfused", "peft", "fused", "hybrid", "compile",
                         "bnb4-base", "peft-qlora", "qlora-fused", "qlora-hybrid")
DEFAULT_CPU_PROVIDERS = ("base", "unfused", "peft", "torch", "fused", "hybrid") + QUANT_PROVIDERS


def floor_of(provider: str) -> str:
    """The floor a provider's time is divided by: bitsandbytes' 4-bit layer for the 4-bit LoRA
    providers, the dense frozen layer for everything else (``bnb4-base`` included)."""
    return "bnb4-base" if provider in QUANT_PROVIDERS and provider != "bnb4-base" else "base"


class Problem(tuple):
    """(x, W, b, A, B, grad_y, magnitude or None); on a 4-bit shape ``quant`` holds the 4-bit weight
    (:class:`.quant_providers.QuantProblem`) and W is its dequantisation in the shape's dtype."""
    quant = None


# -------------------------------------------------------------------------------------- providers

def make_problem(shape: Shape, device: str, seed: int = 0) -> Problem:
    """(x, W, b, A, B, grad_y, magnitude or None), random (B too), in the shape's dtype. On a 4-bit
    shape W is quantised (by bitsandbytes when installed, else by lora_kernels' own quantiser, whose
    bytes are equal) and replaced by its dequantisation, so every provider computes the same function."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dt)

    x = rnd(shape.m, shape.k).requires_grad_(True)
    w = rnd(shape.n, shape.k, std=shape.k ** -0.5)
    quant = None
    if shape.quant:
        from .quant_providers import quantize_weight

        quant = quantize_weight(w, shape.quant)
        w = quant.qweight.dequantize(dt)
    bias = rnd(shape.n)
    a = rnd(shape.r, shape.k, std=shape.k ** -0.5).requires_grad_(True)
    b = rnd(shape.n, shape.r, std=shape.r ** -0.5).requires_grad_(True)
    grad = rnd(shape.m, shape.n)
    mag = None
    if shape.dora:
        mag = (dora_weight_norm_ref(w.float(), a.detach().float(), b.detach().float(), SCALE) * 1.1).to(dt)
        mag.requires_grad_(True)
    problem = Problem((x, w, bias, a, b, grad, mag))
    problem.quant = quant
    return problem


@dataclass
class Provider:
    fn: object  # zero-argument callable computing y
    params: list  # tensors to differentiate, in the order of grad_names
    grad_names: list
    owned: list = field(default_factory=list)  # the provider's own copies of the parameters


class Unavailable(Exception):
    """A provider that cannot run here (peft missing, no Triton, ...): reported, not failed."""


def _reference_formula(x, w, bias, a, b, mag, scale: float, p: float):
    """The reference's LoRA / DoRA formula (lora_kernels.reference) with F.dropout's mask: what
    ``compile`` compiles."""
    xd = F.dropout(x, p, training=True) if p > 0 else x
    if mag is None:
        return F.linear(x, w, bias) + scale * ((xd @ a.t()) @ b.t())
    c = mag / dora_weight_norm_ref(w, a, b, scale).detach()
    base = x @ w.t()
    if p > 0:
        y = base + (c - 1) * (xd @ w.t()) + c * (scale * ((xd @ a.t()) @ b.t()))
    else:
        y = c * (base + scale * ((x @ a.t()) @ b.t()))
    return y + bias


def peft_one_layer(model: torch.nn.Module, shape, scale: float, p: float, x, a, b, mag):
    """PEFT's LoRA/DoRA on ``model.proj`` (PEFT's defaults: it may keep adapters in fp32), its adapter
    set to (a, b, mag): (peft model, the PEFT layer, the tensors whose gradients are compared)."""
    import peft

    cfg = peft.LoraConfig(r=shape.r, lora_alpha=scale * shape.r, lora_dropout=p, target_modules=["proj"],
                          use_dora=shape.dora)
    model = peft.get_peft_model(model, cfg)
    layer = model.base_model.model.proj
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        if shape.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(mag)
            params.append(layer.lora_magnitude_vector["default"].weight)
    model.train()
    return model, layer, params


def applies(provider: str, shape: Shape) -> bool:
    """Whether ``provider`` runs on ``shape``: not ``unfused`` for DoRA, not a 4-bit provider on a dense
    shape, not a dense LoRA provider other than ``base`` on a 4-bit shape."""
    if provider in QUANT_PROVIDERS:
        return bool(shape.quant)
    if shape.quant and provider != "base":
        return False
    return not (provider == "unfused" and shape.dora)


def not_applicable(providers, shapes) -> str | None:
    """Why some of ``providers`` would run on none of ``shapes`` (a bench request that would silently
    measure nothing for them), or None when each applies to at least one shape."""
    idle = [p for p in providers if not any(applies(p, s) for s in shapes)]
    if not idle:
        return None
    quant = [p for p in idle if p in QUANT_PROVIDERS]
    dense = [p for p in idle if p not in QUANT_PROVIDERS and p != "unfused"]
    why = []
    if quant:
        why.append(f"{', '.join(quant)} {'runs' if len(quant) == 1 else 'run'} on 4-bit shapes only and the grid has none (add --quant nf4 or "
                   "--quant none,nf4)")
    if dense:
        why.append(f"{', '.join(dense)} {'runs' if len(dense) == 1 else 'run'} on dense shapes only and the grid has only 4-bit ones (add none to "
                   "--quant, e.g. --quant none,nf4)")
    if "unfused" in idle:
        why.append("unfused runs on dense LoRA shapes only and the grid has none (it has no DoRA or 4-bit "
                   "version; add --kinds lora, or none to --quant)")
    return "--providers: " + "; ".join(why)


def provider_fn(provider: str, shape: Shape, problem, scale: float = SCALE,
                compile_backend: str = "inductor") -> Provider | None:
    """The provider's callable for ``shape``; None when it does not apply (:func:`applies`);
    raises :class:`Unavailable` when it cannot run here."""
    if not applies(provider, shape):
        return None
    if provider in QUANT_PROVIDERS:
        from .quant_providers import quant_provider_fn

        return quant_provider_fn(provider, shape, problem, scale)
    x, w, bias, a, b, _, mag = problem
    p = shape.dropout_p
    dora_names = ["dx", "dA", "dB", "dm"] if shape.dora else ["dx", "dA", "dB"]
    lora_params = [x, a, b] + ([mag] if shape.dora else [])
    if provider == "base":
        return Provider(lambda: F.linear(x, w, bias), [x], ["dx"])
    if provider == "unfused":
        def unfused():
            y = F.linear(x, w, bias)
            xd = F.dropout(x, p, training=True) if p > 0 else x
            return y.addmm_(xd @ a.t(), b.t(), alpha=scale)
        return Provider(unfused, [x, a, b], ["dx", "dA", "dB"])
    if provider == "compile":
        try:
            compiled = torch.compile(_reference_formula, backend=compile_backend, dynamic=False)
        except Exception as exc:  # e.g. no compiler support on this platform
            raise Unavailable(f"torch.compile unavailable: {type(exc).__name__}: {exc}") from exc
        return Provider(lambda: compiled(x, w, bias, a, b, mag, scale, p), lora_params, dora_names)
    if provider == "peft":
        try:
            import peft  # noqa: F401  (installed? peft_one_layer uses it)
        except ImportError as exc:
            raise Unavailable("peft is not installed") from exc

        class _One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(shape.k, shape.n, device=x.device, dtype=x.dtype)

            def forward(self, inp):
                return self.proj(inp)

        model = _One()
        with torch.no_grad():
            model.proj.weight.copy_(w)
            model.proj.bias.copy_(bias)
        model, layer, params = peft_one_layer(model, shape, scale, p, x, a, b, mag)
        return Provider(lambda: layer(x), params, dora_names, owned=list(model.parameters()))
    if provider in ("fused", "hybrid"):
        if not HAS_TRITON:
            raise Unavailable("Triton is not installed")
        if x.device.type != "cuda" and not is_interpreter():
            raise Unavailable("the Triton paths need a GPU or TRITON_INTERPRET=1")
    if provider in OUR_PROVIDERS and shape.dora:
        return Provider(lambda: dora_linear(x, w, a, b, mag, scale, bias=bias, dropout_p=p, seed=SEED,
                                            backend=provider), lora_params, dora_names)
    if provider in OUR_PROVIDERS:
        return Provider(lambda: lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, seed=SEED, backend=provider),
                        lora_params, dora_names)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")

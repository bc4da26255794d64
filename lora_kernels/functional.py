"""The functional API: ``lora_linear`` and ``dora_linear``.

Both are ``torch.compile(fullgraph=True)``-friendly: validation reads only metadata, and a seed
drawn for ``seed=None`` stays a tensor (see :func:`lora_kernels.dropout.draw_seed_tensor`).

Autocast: when ``torch.autocast`` is enabled for x's device type, x, the frozen weight, the bias
and the adapters (fp16/bf16/fp32 ones) are cast to the autocast dtype here, as autocast does for
``F.linear``, and the op runs in that dtype (autocast off inside it); gradients flow back to each
tensor in its own dtype. Outside autocast nothing is cast implicitly except the adapters and
the bias (to x's dtype); the frozen weight must then have x's dtype.
"""
from __future__ import annotations

import math

import torch

from . import functions  # noqa: F401  (registers the lora_kernels:: custom ops)
from .functions import refuse_forward_ad
from ._validation import check_dora_inputs, check_dropout, check_lora_inputs, check_scale, check_seed
from .backends import resolve_backend
from .dropout import draw_seed_tensor
from .quant.format import QuantizedWeight

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_device_types() -> frozenset[str]:
    """Device types with an autocast mode, asked once at import: torch.amp.is_autocast_available
    is not traceable by torch 2.11's dynamo (a skipped function: fullgraph=True raises), while a
    membership test on a constant frozenset is."""
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "ipu", "maia"]
    try:
        names.append(torch._C._get_privateuse1_backend_name())
    except Exception:  # pragma: no cover - very old torch
        pass
    found = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                found.add(name)
        except Exception:  # pragma: no cover - an unknown device type name on this torch
            pass
    return frozenset(found)


_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ, forward and backward fused where a kernel exists.

    Args:
        x: (..., K) input, any leading dims and strides (viewed as M×K; a copy is made only when
            the leading dims cannot be flattened as a view).
        weight: (N, K) frozen weight; must have x's dtype (outside autocast). bias: (N,) or None.
        lora_a: (r, K); lora_b: (N, r). If their dtype (or bias's) differs from x's, e.g. fp32
            adapters with bf16 activations, they are cast to x's dtype for the computation
            (gradients flow back to them in their own dtype). Under ``torch.autocast`` for x's
            device type, x, weight, bias and adapters are all cast to the autocast dtype first
            (fp16/bf16/fp32 tensors; a float64 x is left alone), and y has that dtype.
        scale: s, e.g. alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA).
        dropout_p: dropout probability on the adapter's input, in [0, 1); active only if training.
        seed: seed of the dropout mask: an int in [0, 2**63), or a 1-element integer tensor (best on
            the CPU; its value is read inside the op, so it can change between calls of a compiled
            model without recompiling). None draws one from torch's default CPU generator as an
            int64 tensor (traceable by torch.compile; reproducible under torch.manual_seed; re-drawn
            identically by torch.utils.checkpoint's recomputation, which restores the CPU RNG
            state). Same seed, same mask, on every backend.
        training: False disables dropout.
        backend: 'auto' | 'torch' | 'triton' | 'fused' | 'hybrid' (see lora_kernels.backends);
            None reads $LORA_KERNELS_BACKEND, else 'auto'.

    Returns:
        y of shape (..., N) and x's dtype.

    ``weight`` may also be a 4-bit :class:`lora_kernels.quant.QuantizedWeight` (QLoRA): same maths on
    the dequantised weight, see :mod:`lora_kernels.qlora`.
    """
    if isinstance(weight, QuantizedWeight):  # QLoRA (issue 17)
        from . import qlora
        return qlora.lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, training, backend)
    refuse_forward_ad("lora_linear", x, weight, lora_a, lora_b, bias)
    x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed, seed_tensor = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = resolve_backend(backend, x2d, weight.shape[0], lora_a.shape[0])
    y, _ = torch.ops.lora_kernels.lora_linear_fwd(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, impl,
                                                  seed_tensor)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _autocast(x, weight, lora_a, lora_b, bias):
    """Under torch.autocast for x's device type: the fp16/bf16/fp32 tensors in the autocast dtype."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _AUTOCAST_ELIGIBLE:
        return x, weight, lora_a, lora_b, bias
    device_type = x.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return x, weight, lora_a, lora_b, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype:
            return t.to(dtype)
        return t

    return cast(x), cast(weight), cast(lora_a), cast(lora_b), cast(bias)


def _seed_arguments(seed, dropout_p):
    """(seed int, seed tensor or None) for the ops; seed=None with dropout draws a seed tensor."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool or seed.numel() != 1:
            raise TypeError(f"seed must be an int, a 1-element integer tensor or None, got a tensor of dtype "
                            f"{seed.dtype} and shape {tuple(seed.shape)}")
        return 0, (seed if dropout_p > 0.0 else None)
    if seed is None:
        return 0, (draw_seed_tensor() if dropout_p > 0.0 else None)
    return check_seed(seed), None


def _prepare(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training):
    """Validated arguments (autocast applied), adapters/bias in x's dtype, x viewed as M×K."""
    x, weight, lora_a, lora_b, bias = _autocast(x, weight, lora_a, lora_b, bias)
    check_lora_inputs(x, weight, lora_a, lora_b, bias)
    scale = check_scale(scale)
    dropout_p = check_dropout(dropout_p) if training else 0.0
    seed, seed_tensor = _seed_arguments(seed, dropout_p)
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    rows = math.prod(x.shape[:-1])  # not reshape(-1, K): K may be 0
    return x.reshape(rows, x.shape[-1]), weight, lora_a, lora_b, bias, scale, dropout_p, seed, seed_tensor


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """DoRA linear (PEFT's definition, DESIGN.md §3), forward and backward fused where a kernel exists.

    With n_j = ‖W_j + s·(B·A)_j‖₂ (detached, fp32, streamed: never materialising W + s·B·A) and c = m/n:
      training with dropout_p > 0:  y = x·Wᵀ + b + (c − 1) ⊙ (xd·Wᵀ) + c ⊙ s·(xd·Aᵀ)·Bᵀ
      otherwise:                    y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b

    Args are those of :func:`lora_linear`, plus ``magnitude`` m (N,), any floating dtype (the
    gradient dm comes back in it; autocast does not cast it). A weight that requires grad (a
    trained base weight, or FSDP(use_orig_params=True)) gets dW in plain torch, n detached as above.
    ``weight`` may be a 4-bit :class:`lora_kernels.quant.QuantizedWeight` (QLoRA).
    """
    if isinstance(weight, QuantizedWeight):  # QLoRA (issue 17)
        from . import qlora
        return qlora.dora_linear(x, weight, lora_a, lora_b, magnitude, scale, bias, dropout_p, seed, training,
                                 backend)
    check_dora_inputs(weight, magnitude)
    refuse_forward_ad("dora_linear", x, weight, lora_a, lora_b, magnitude, bias)
    x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed, seed_tensor = _prepare(
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, training)
    impl = resolve_backend(backend, x2d, weight.shape[0], lora_a.shape[0])
    y, _, _, _ = torch.ops.lora_kernels.dora_linear_fwd(
        x2d, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, impl, seed_tensor)
    return y.reshape(*x.shape[:-1], weight.shape[0])

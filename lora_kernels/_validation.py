"""Validation of user input at the public boundary: errors name the argument and show what came in."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return int(rank)


def check_dropout(dropout_p, name: str = "dropout_p") -> float:
    """``name``: the argument as the caller's user wrote it (``dropout`` for layers and LoraConfig)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def check_lora_inputs(x, weight, lora_a, lora_b, bias) -> None:
    """Shapes, dtypes and devices of the tensors of ``lora_linear``."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_a", lora_a, ndim=2)
    check_tensor("lora_b", lora_b, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features: "
                         f"x has shape {tuple(x.shape)}, weight has shape {tuple(weight.shape)} (out, in)")
    r = lora_a.shape[0]
    if r == 0:
        raise ValueError(f"rank must be >= 1: lora_a has shape {tuple(lora_a.shape)} (r, in)")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, {k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(lora_a.shape)}")
    if lora_b.shape != (n, r):
        raise ValueError(f"lora_b must have shape ({n}, {r}) (out_features, rank of lora_a {tuple(lora_a.shape)}), "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias must have shape ({n},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype ({weight.dtype}) must equal x dtype ({x.dtype}); cast x or the layer "
                        "(the frozen weight is never cast implicitly)")
    devices = {"x": x.device, "weight": weight.device, "lora_a": lora_a.device, "lora_b": lora_b.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {shown}")


def check_dora_inputs(weight, magnitude) -> None:
    """The DoRA-only arguments (the rest is checked by ``check_lora_inputs``)."""
    check_tensor("magnitude", magnitude, ndim=1)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},) (one per output row of weight "
                         f"{tuple(weight.shape)}), got {tuple(magnitude.shape)}")
    if isinstance(weight, torch.Tensor) and magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, weight on {weight.device}: one device expected")

"""nn.Modules that swap into models: ``LoRALinear``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_dropout, check_rank
from .backends import requested_backend
from .functional import lora_linear

INITS = ("kaiming", "gaussian")


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ.

    Parameters: ``lora_A`` (r × in_features) and ``lora_B`` (out_features × r), in the base
    weight's dtype and device. The base layer (``base_layer``) is frozen. B starts at zero, so the
    output equals the base layer's at step 0. ``merge()`` folds s·B·A into the base weight (for
    zero-overhead inference) and ``unmerge()`` takes it out again.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", backend: str | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        rank = check_rank(rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise TypeError(f"alpha must be a finite number, got {alpha!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if backend is not None:
            requested_backend(backend)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scale = lora_scale(rank, self.alpha, self.use_rslora)
        self.dropout = check_dropout(dropout)
        self.backend = backend
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        self.merged = False
        self.reset_lora_parameters(init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", backend: str | None = None) -> "LoRALinear":
        """Wrap ``linear`` (kept as ``base_layer``, its parameters frozen in place)."""
        return cls(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init, backend=backend)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A ~ kaiming-uniform(a=√5) (as nn.Linear) or N(0, 1/r²) ('gaussian', PEFT's); B = 0."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the adapter is already inside the weight
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, bias=self.bias,
                           dropout_p=self.dropout, training=self.training, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32 (N × K)."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·B·A, computed in float32 and cast back to W's dtype."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged; call unmerge() first")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·B·A (restores W within the rounding of its dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"rslora={self.use_rslora}, merged={self.merged}")

"""nn.Modules that swap into models: ``LoRALinear``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_dropout, check_rank
from .backends import requested_backend
from .dora import dora_weight_norm_torch
from .functional import dora_linear, lora_linear

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

    With ``use_dora=True`` the layer is DoRA (PEFT's definition, see ``lora_kernels.dora_linear``):
    a trainable magnitude ``lora_magnitude`` (out_features,) starts at the row norms of W, so the
    output again equals the base layer's at step 0 (exactly in fp32; within the rounding of m in
    lower precision).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                 use_dora: bool = False):
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
        self.use_dora = bool(use_dora)
        self.lora_magnitude = None
        self.register_buffer("_merged_dora_scale", None, persistent=False)
        self.reset_lora_parameters(init)
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(self.dora_weight_norm().to(w.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                    use_dora: bool = False) -> "LoRALinear":
        """Wrap ``linear`` (kept as ``base_layer``, its parameters frozen in place)."""
        return cls(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init, backend=backend,
                   use_dora=use_dora)

    @torch.no_grad()
    def dora_weight_norm(self) -> torch.Tensor:
        """n_j = ‖W_j + s·(B·A)_j‖ in fp32, never building W + s·B·A (lora_kernels.dora)."""
        return dora_weight_norm_torch(self.base_layer.weight, self.lora_A, self.lora_B, self.scale)

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
        if self.use_dora:
            return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.lora_magnitude, self.scale,
                               bias=self.bias, dropout_p=self.dropout, training=self.training,
                               backend=self.backend)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, bias=self.bias,
                           dropout_p=self.dropout, training=self.training, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32 (N × K)."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·B·A (DoRA: W ← c ⊙ (W + s·B·A), c = m/n), in float32, cast back to W's dtype."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged; call unmerge() first")
        w = self.base_layer.weight
        merged = w.float() + self.delta_weight()
        if self.use_dora:
            c = self.lora_magnitude.detach().float() / self.dora_weight_norm().float()
            if not torch.all(torch.isfinite(c)) or torch.any(c == 0):
                raise RuntimeError("LoRALinear.merge(): the DoRA scale m/n has zero or non-finite entries; "
                                   "merging would not be reversible")
            merged.mul_(c[:, None])
            self._merged_dora_scale = c
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (restores W within the rounding of its dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        w = self.base_layer.weight
        restored = w.float()
        if self.use_dora:
            restored.div_(self._merged_dora_scale[:, None])
            self._merged_dora_scale = None
        w.copy_((restored - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"rslora={self.use_rslora}, dora={self.use_dora}, merged={self.merged}")

"""Adapters stacked per layer: A as [n_adapters, r_max, K], B as [n_adapters, N, r_max].

Design choice: the per-adapter parameters stay the storage (``LoraAdapter.lora_A`` / ``lora_B`` /
``lora_magnitude``, or a PEFT layer's ``lora_A[name].weight`` ...), and the stack is a cache that is
rebuilt only when it is stale. Staleness is read from a key made of, per adapter, the identity and
the version counter (``tensor._version``, bumped by every in-place write: optimizer steps,
``load_state_dict``, ``copy_``, merges of PiSSA residuals...) of each tensor, plus its scale, dropout
and name, and the frozen weight's identity and version (DoRA's c = m/n depends on W). Adding,
deleting, loading or training an adapter changes the key; a serving loop that changes nothing reuses
the stack with no copy per call. Why not the other way round (the stack as storage, parameters as
views into it): adding an adapter would reallocate the stack and replace every adapter's Parameter
objects, silently detaching them from optimizers and from PEFT's / the user's references.

Padding: ranks below r_max are zero-padded (the kernels also mask by each adapter's rank). The
stack is cast once to the compute dtype; DoRA's per-adapter column scale c = m / n (n from the
streamed norm of :mod:`lora_kernels.dora`, fp32) is cached with it, as 1 for LoRA adapters.
Training does not use the stack: gradients flow to the per-adapter parameters directly (torch path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..dora import dora_weight_norm_torch
from ..dropout import dropout_threshold, keep_scale


@dataclass
class AdapterSpec:
    """One adapter as the multi-adapter paths see it (built from a LoRALinear or a PEFT layer).

    lora_a: (r, K); lora_b(): (N, r) (a callable, so a block-diagonal per-slice B is built only on a
    restack); magnitude: DoRA's m (N,) or None. ``versioned``: the tensors whose identity and version
    decide whether a cached stack is stale.
    """
    name: str
    lora_a: torch.Tensor
    lora_b: Callable[[], torch.Tensor]
    scale: float
    dropout: float
    magnitude: torch.Tensor | None = None
    versioned: tuple = field(default=())

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def key(self) -> tuple:
        return (self.name, float(self.scale), float(self.dropout), self.use_dora,
                tuple((id(t), t._version, t.data_ptr()) for t in self.versioned))


@dataclass
class StackedAdapters:
    names: list[str]
    a: torch.Tensor                  # (n, r_max, K), compute dtype
    b: torch.Tensor                  # (n, N, r_max), compute dtype
    ranks: torch.Tensor              # (n,) int32
    scales: torch.Tensor             # (n,) fp32
    dropout: torch.Tensor            # (n,) fp32: p as given
    threshold: torch.Tensor          # (n,) int32: the 8-bit mask threshold t (lora_kernels.dropout)
    keep_scale: torch.Tensor         # (n,) fp32: 1/(1 - p_eff), p_eff = t/256
    dora_scale: torch.Tensor | None  # (n, N) fp32: c = m/n for DoRA adapters, 1 for LoRA; None if no DoRA
    use_dora: list[bool]
    dropout_list: list[float]

    @property
    def r_max(self) -> int:
        return self.a.shape[1]


@torch.no_grad()
def build_stack(specs: list[AdapterSpec], weight: torch.Tensor, dtype: torch.dtype) -> StackedAdapters:
    """Stack ``specs`` (one copy of every adapter, padded to the largest rank) in ``dtype``."""
    n = len(specs)
    n_out, k = weight.shape
    device = weight.device
    r_max = max((s.rank for s in specs), default=0)
    a = torch.zeros((n, r_max, k), dtype=dtype, device=device)
    b = torch.zeros((n, n_out, r_max), dtype=dtype, device=device)
    any_dora = any(s.use_dora for s in specs)
    c = torch.ones((n, n_out), dtype=torch.float32, device=device) if any_dora else None
    for i, s in enumerate(specs):
        full_b = s.lora_b()
        a[i, :s.rank] = s.lora_a.detach().to(dtype)
        b[i, :, :s.rank] = full_b.detach().to(dtype)
        if s.use_dora:
            norm = dora_weight_norm_torch(weight, s.lora_a, full_b, s.scale)
            c[i] = s.magnitude.detach().float() / norm.float()
    p = [float(s.dropout) for s in specs]
    for s, q in zip(specs, p):
        if not 0.0 <= q < 1.0:
            raise ValueError(f"adapter {s.name!r}: dropout must be in [0, 1), got {q}")
    return StackedAdapters(
        names=[s.name for s in specs], a=a, b=b,
        ranks=torch.tensor([s.rank for s in specs], dtype=torch.int32, device=device),
        scales=torch.tensor([float(s.scale) for s in specs], dtype=torch.float32, device=device),
        dropout=torch.tensor(p, dtype=torch.float32, device=device),
        threshold=torch.tensor([dropout_threshold(q) for q in p], dtype=torch.int32, device=device),
        keep_scale=torch.tensor([keep_scale(q) for q in p], dtype=torch.float32, device=device),
        dora_scale=c, use_dora=[s.use_dora for s in specs], dropout_list=p,
    )


_CACHE_ATTR = "_lora_kernels_multi_stack"
restack_count = 0  # how many stacks were built (tests read it to check that nothing is copied per call)


def cached_stack(owner, specs: list[AdapterSpec], weight: torch.Tensor, dtype: torch.dtype,
                 weight_param: torch.Tensor | None = None) -> StackedAdapters:
    """The stack of ``specs`` for module ``owner``, rebuilt only when the key (names, versions,
    scales, W's version, dtype) changed since the last call. Kept in ``owner.__dict__`` (not a buffer:
    never saved in a state dict). ``weight_param``: the stored frozen weight when ``weight`` is a
    fresh view of it (GPT-2 Conv1D's transpose), so its identity is stable between calls."""
    global restack_count
    wp = weight if weight_param is None else weight_param
    key = (tuple(s.key() for s in specs), id(wp), wp._version, wp.data_ptr(), dtype, weight.device)
    hit = owner.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        return hit[1]
    stack = build_stack(specs, weight, dtype)
    owner.__dict__[_CACHE_ATTR] = (key, stack)
    restack_count += 1
    return stack


def clear_stack(owner) -> None:
    owner.__dict__.pop(_CACHE_ATTR, None)

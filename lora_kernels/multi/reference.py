"""Oracles for several adapters at once, in plain PyTorch (cast inputs to float64 for tests).

Built on the single-adapter references (:mod:`lora_kernels.reference`) and written for clarity, not
speed. An adapter is an :class:`~lora_kernels.multi.store.AdapterSpec`.

- :func:`mixed_batch_ref`: row m uses adapter ``row_adapter[m]`` (−1: the base layer alone). It runs
  every adapter on the WHOLE batch with the single-adapter reference and picks the rows, so row m's
  dropout mask is row m of that adapter's M×K mask (its own seed): exactly "the adapters one by one".
- :func:`active_adapters_ref`: PEFT's semantics for several active adapters (peft/tuners/lora/layer.py
  ``Linear.forward`` and variants.py ``DoraLinearVariant.forward``): starting from the base output,
  adapters are applied in order; a LoRA adapter adds s·(drop(x)·Aᵀ)·Bᵀ; a DoRA adapter adds
  (c − 1) ⊙ base + c ⊙ s·(xd·Aᵀ)·Bᵀ with c = m / ‖W + s·B·A‖ (detached), where base = xd·Wᵀ when its
  dropout is active (training, p > 0) and otherwise the running result minus the bias (so a DoRA
  adapter also rescales the adapters applied before it, as PEFT does).
"""
from __future__ import annotations

import torch

from ..dropout import dropout_mask
from ..reference import dora_linear_ref, dora_weight_norm_ref, lora_linear_ref


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def mixed_batch_ref(x, weight, bias, adapters, row_adapter, training=False, seeds=None):
    """y (…, N): row m through adapter row_adapter[m] (flattened rows), −1 = base layer only."""
    x2d = _flat(x)
    idx = row_adapter.reshape(-1).to(torch.int64)
    y = x2d @ weight.t()
    if bias is not None:
        y = y + bias
    for i, a in enumerate(adapters):
        rows = (idx == i).nonzero().flatten()
        if rows.numel() == 0:
            continue
        p = a.dropout if training else 0.0
        seed = 0 if seeds is None else int(seeds[i])
        b = a.lora_b()
        if a.use_dora:
            ya = dora_linear_ref(x2d, weight, a.lora_a, b, a.magnitude, a.scale, bias, p, seed)
        else:
            ya = lora_linear_ref(x2d, weight, a.lora_a, b, a.scale, bias, p, seed)
        y = y.index_copy(0, rows, ya.index_select(0, rows))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def active_adapters_ref(x, weight, bias, adapters, active, training=False, seeds=None):
    """y (…, N) with the adapters ``active`` (indices into ``adapters``) applied in order."""
    x2d = _flat(x)
    m, k = x2d.shape
    y = x2d @ weight.t()
    if bias is not None:
        y = y + bias
    for i in active:
        a = adapters[i]
        p = a.dropout if training else 0.0
        seed = 0 if seeds is None else int(seeds[i])
        xd = x2d * dropout_mask(seed, m, k, p, dtype=x2d.dtype, device=x2d.device) if p > 0 else x2d
        b = a.lora_b()
        lora = a.scale * ((xd @ a.lora_a.t()) @ b.t())
        if a.use_dora:
            c = a.magnitude / dora_weight_norm_ref(weight, a.lora_a, b, a.scale).detach()
            if p > 0:
                base = xd @ weight.t()
            else:
                base = y - bias if bias is not None else y
            y = y + (c - 1) * base + c * lora
        else:
            y = y + lora
    return y.reshape(*x.shape[:-1], weight.shape[0])

"""The kernel families ``lora-kernels check`` validates (the runner is :mod:`lora_kernels.check`).

One module per family, each defining ``FAMILY`` (a :class:`~.base.Family`): its cases per grid
(quick / small / gpu), its paths, how a case is prepared (fresh random inputs and the float64
reference, once per case) and how one path is measured against it.

- :mod:`.lora`   single-adapter LoRA / DoRA (``lora_linear`` / ``dora_linear``): y and every gradient
- :mod:`.multi`  several adapters (``multi_adapter_linear``): mixed batches and several active
                 adapters, y and the LoRA gradients; DoRA adapters in inference
- :mod:`.qlora`  4-bit weights: the dequantisation kernel bit for bit, and LoRA / DoRA on a
                 ``QuantizedWeight`` (NF4 / FP4, nested or not) against the reference on deq(Q)
- :mod:`.groups` projection groups (``grouped_lora``): against the float64 reference and against
                 separate ``lora_linear`` calls on the same backend
"""
from __future__ import annotations

import importlib

from .base import Family

FAMILY_NAMES = ("lora", "multi", "qlora", "groups")


def family(name: str) -> Family:
    """The family ``name`` (its module is imported on first use: the kernels are imported lazily)."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown family {name!r}: expected one of {', '.join(FAMILY_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


__all__ = ["FAMILY_NAMES", "Family", "family"]

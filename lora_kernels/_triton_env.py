"""Where Triton is installed and whether it runs in its CPU interpreter.

Triton itself is imported only by :mod:`lora_kernels.kernels` (and lazily, when a Triton path is
first used), never at package import: the interpreter switch ``TRITON_INTERPRET=1`` is read when
Triton is imported, so a command such as ``lora-kernels check`` can still turn it on after
``import lora_kernels``. The package imports and its torch backend works without Triton.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> str | None:
    if not HAS_TRITON:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source builds
        return "unknown"

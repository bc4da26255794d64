"""Where Triton is importable and whether it runs in its CPU interpreter.

Everything that touches ``triton`` goes through this module so the package still imports (and the
torch backend still works) on machines without Triton.
"""
from __future__ import annotations

import os

try:  # pragma: no cover - exercised implicitly by every import
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CI has triton; this is the no-triton fallback
    triton = None
    tl = None
    HAS_TRITON = False


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> str | None:
    return triton.__version__ if HAS_TRITON else None

"""Backend choice, in one place.

A backend name says which implementation computes LoRA:

==========  ==============================================================================
``auto``    ``triton`` for CUDA tensors, ``torch`` otherwise (the default)
``torch``   plain torch ops (:mod:`lora_kernels.torch_backend`), any device
``triton``  the Triton kernels, with the path (fused or hybrid) picked per shape by
            :func:`choose_triton_path`
``fused``   the Triton kernels, fused path (Triton GEMMs with LoRA epilogues)
``hybrid``  the Triton kernels, hybrid path (cuBLAS GEMMs + Triton LoRA kernels)
==========  ==============================================================================

Precedence: the ``backend=`` argument, then the environment variable ``LORA_KERNELS_BACKEND``,
then ``auto``. The Triton kernels run on CUDA tensors, or on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, used by the tests). Asking for Triton where it cannot run is
an error, never a silent fallback. float64 and ranks above 256 have no kernel: ``auto`` routes them to
``torch`` (ranks: with a one-time warning), an explicit Triton backend refuses them.
"""
from __future__ import annotations

import os
import warnings

import torch

from ._triton_env import HAS_TRITON, is_interpreter

BACKENDS = ("auto", "torch", "triton", "fused", "hybrid")
ENV_VAR = "LORA_KERNELS_BACKEND"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_RANK = 256  # rank-wide tiles live in registers; larger ranks use the torch backend

_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else $LORA_KERNELS_BACKEND, else 'auto' (validated)."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


# Outputs up to this wide take the fused path on CUDA (see choose_triton_path).
FUSED_MAX_N = 1024


def choose_triton_path(m: int, n: int, k: int, r: int, device: torch.device) -> str:
    """Fused or hybrid for one shape (the rule that ``triton`` and ``auto`` use).

    From the compile-level report's model (``lora-kernels inspect``; docs/performance-model.md), at
    the realistic efficiencies (Triton GEMM 80 %, cuBLAS 95 %) and Llama-3-8B shapes, M = 8192,
    r = 16: where the output is narrow (k/v, N = 1024) the fused path's one GEMM beats cuBLAS plus
    the in-place expand pass (modeled 1.56× vs 1.70× the frozen base at p = 0, level at p = 0.1);
    at N ≥ 4096 (q/o, gate/up, down) cuBLAS's GEMMs win (hybrid 1.13–1.22× vs fused 1.26–1.35×).
    So: fused for N ≤ FUSED_MAX_N, hybrid above, on CUDA; fused under the interpreter. These are
    modeled figures: docs/benchmarks.md records the GPU measurements this rule must be revised against.
    """
    if device.type != "cuda":
        return "fused"
    return "fused" if n <= FUSED_MAX_N else "hybrid"


def resolve_backend(backend: str | None, x: torch.Tensor, n: int, r: int) -> str:
    """The concrete implementation for this call: 'torch', 'fused' or 'hybrid'."""
    requested = requested_backend(backend)
    if requested == "torch":
        return "torch"
    m, k = x.shape[0], x.shape[-1]
    if requested == "auto":
        if x.device.type != "cuda" or x.dtype not in KERNEL_DTYPES:
            return "torch"
        if not HAS_TRITON:
            _warn_once("no-triton", "lora_kernels: Triton is not installed, CUDA tensors use the (slower) "
                       "torch backend. Install triton to get the fused kernels.")
            return "torch"
        if r > MAX_KERNEL_RANK:
            _warn_once("rank", f"lora_kernels: rank {r} > {MAX_KERNEL_RANK} has no Triton kernel; "
                       "using the (slower) torch backend")
            return "torch"
        return choose_triton_path(m, n, k, r, x.device)
    # An explicit Triton backend: refuse what the kernels cannot do.
    if not HAS_TRITON:
        raise RuntimeError(f"backend={requested!r} needs Triton, which is not installed")
    if x.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"backend={requested!r} runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                         f"x is on {x.device}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend={requested!r} supports dtypes {KERNEL_DTYPES}, x has {x.dtype}; "
                        "use backend='torch' for other dtypes")
    if r > MAX_KERNEL_RANK:
        raise ValueError(f"backend={requested!r} supports ranks up to {MAX_KERNEL_RANK}, got rank {r}; "
                         "use backend='torch' for larger ranks")
    if requested == "triton":
        return choose_triton_path(m, n, k, r, x.device)
    return requested

"""What a family of ``lora-kernels check`` is, and the helpers every family shares."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .._triton_env import HAS_TRITON, is_interpreter
from ..testing import TOLERANCES, rel_error


@dataclass(frozen=True)
class Family:
    """One family of kernels: cases, paths, and how a path is measured on a case.

    ``prepare(case, device)`` draws fresh inputs and computes the float64 reference once per case;
    ``run(path, case, prepared, device)`` returns ``{quantity: error}`` for one path (an error above
    ``tolerance(path, case)`` fails, NaN too). ``legend``: comment lines explaining the case column.
    """
    name: str
    title: str
    legend: tuple[str, ...]
    grids: dict[str, list]
    kernel_paths: tuple[str, ...]  # the Triton paths (run where kernels_run_here); "torch" always runs
    prepare: Callable[[Any, str], Any]
    run: Callable[[str, Any, Any, str], dict[str, float]]
    tolerance: Callable[[str, Any], float] = lambda path, case: TOLERANCES[case.dtype]

    @property
    def all_paths(self) -> tuple[str, ...]:
        return ("torch", *self.kernel_paths)

    def available(self, device: str) -> list[str]:
        """The paths that can run on ``device``."""
        return list(self.all_paths if kernels_run_here(device) else ("torch",))


def kernels_run_here(device: str) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or CPU tensors in the interpreter)."""
    return HAS_TRITON and (device == "cuda" or is_interpreter())


@contextlib.contextmanager
def nan_empty():
    """``torch.empty`` / ``empty_like`` / ``empty_strided`` / ``new_empty`` return NaN-filled floating tensors inside: an
    output buffer element no kernel wrote stays NaN, and a NaN cannot pass a tolerance."""
    empty, empty_like, strided, new_empty = torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    torch.empty_strided = lambda *a, **k: poison(strided(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = empty, empty_like, strided, new_empty


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh leaf copy of ``t`` that requires grad (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_(True)


def errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """``‖out − ref‖ / ‖ref‖`` per quantity of ``ref`` (float64, on the CPU)."""
    return {q: rel_error(out[q].detach().cpu(), ref[q].detach().cpu()) for q in ref}


def randn(generator: torch.Generator, dtype: torch.dtype, device: str):
    """``rnd(*shape, std=1)``: N(0, std²) drawn in float64 from ``generator``, rounded to ``dtype``."""
    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype).to(device)

    return rnd

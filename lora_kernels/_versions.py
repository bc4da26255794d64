"""The torch / triton pairs CI tests: the one place that says which versions are supported.

.ci/run reads ``TESTED_PAIRS`` from this file (without importing the package) to install each leg,
tests/test_versions.py checks that pyproject.toml's ranges span exactly these pairs, and
``lora-kernels info`` says whether the installed pair is one of them.

  newest       the full test suite (torch's CPU build)
  gpu-machine  the pair on the GPU machine this project is measured on: the kernel, dropout, DoRA,
               compile, determinism and autocast tests in Triton's interpreter (PyPI's CUDA build
               of torch, run on CPU; numpy < 2.4 there, as triton 3.6's interpreter needs it)

The oldest pair is the declared floor (pyproject.toml: torch >= 2.11, triton >= 3.6); older ones are
not tested and not admitted.
"""
from __future__ import annotations

# (leg, torch, triton, extra pip requirements of that leg)
TESTED_PAIRS = (
    ("newest", "2.13.0", "3.9.0", ()),
    ("gpu-machine", "2.11.0", "3.6.0", ("numpy<2.4",)),
)


def _release(version: str, parts: int) -> tuple[int, ...]:
    """(2, 11) from '2.11.0+cu130' (parts=2): the release numbers, local/pre-release tags dropped."""
    out = []
    for piece in version.split("+")[0].split(".")[:parts]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits or 0))
    return tuple(out)


def tested_pair(torch_version: str, triton_version: str | None) -> str | None:
    """The CI leg whose torch/triton minor versions match these, else None."""
    if triton_version is None:
        return None
    for leg, torch_v, triton_v, _ in TESTED_PAIRS:
        if _release(torch_version, 2) == _release(torch_v, 2) and _release(triton_version, 2) == _release(triton_v, 2):
            return leg
    return None


def tested_pair_line(torch_version: str, triton_version: str | None) -> str:
    """One line for ``lora-kernels info``."""
    pairs = ", ".join(f"torch {t} + triton {tr}" for _, t, tr, _ in TESTED_PAIRS)
    leg = tested_pair(torch_version, triton_version)
    if leg is not None:
        return f"tested pair: yes (CI leg {leg!r}; CI tests {pairs})"
    if triton_version is None:
        return (f"tested pair: no, Triton is not installed (the torch backend works; CI tests {pairs})")
    return f"tested pair: NO, torch {torch_version} + triton {triton_version} is not tested (CI tests {pairs})"

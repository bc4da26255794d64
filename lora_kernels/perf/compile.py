"""Compile recorded Triton launches for a chosen GPU target, without a GPU.

Triton's own ``JITFunction.run(..., warmup=True)`` does the work (binding, specialisation, the
ASTSource, the pass pipeline, ptxas), so whatever the installed Triton version (3.6 on the GPU
machine, 3.9 here) specialises and compiles is exactly what is inspected. The only thing it needs
from a GPU driver is the current device, stream and target: a small stand-in driver answers those
while compiling. The resulting binary is analysed by :mod:`.sass`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

TARGETS = {"sm_90a": 90, "sm_90": 90, "sm_80": 80, "sm_89": 89, "sm_86": 86}


def capability(target: str) -> int:
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    return TARGETS[target]


class _CompileOnlyDriver:
    """Answers the three questions ``JITFunction.run`` asks a driver; never launches anything."""

    def __init__(self, cap: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap, 32)
        self.device = 10_000 + cap  # a device id of its own per target: Triton keeps one cache per device

    def is_active(self):
        return True

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only_driver(cap: int):
    from triton.runtime.driver import driver

    previous = getattr(driver, "_active", None)  # None until a real driver was asked for: leave it so
    driver.set_active(_CompileOnlyDriver(cap))
    try:
        yield
    finally:
        driver._active = previous


@dataclass
class Binary:
    """One compiled kernel binary."""
    name: str
    target: str
    hash: str
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory Triton asks for at launch
    ptx: str = field(repr=False, default="")
    cubin: bytes = field(repr=False, default=b"")
    ttgir: str = field(repr=False, default="")


def compile_launch(launch, target: str = "sm_90a") -> Binary:
    """Compile one recorded Triton launch (see :mod:`.capture`) for ``target``."""
    cap = capability(target)
    with compile_only_driver(cap):
        kernel = launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    if kernel is None:  # pragma: no cover - only if a jit cache hook swallowed the compile
        raise RuntimeError(f"Triton returned no binary for {launch.name}")
    md = kernel.metadata
    get = (lambda k, d=None: getattr(md, k, d)) if not isinstance(md, dict) else (lambda k, d=None: md.get(k, d))
    asm = kernel.asm
    return Binary(
        name=launch.name, target=target, hash=str(get("hash", "")), num_warps=int(get("num_warps", 4)),
        num_stages=int(get("num_stages", 3)), shared=int(get("shared", 0) or 0),
        ptx=asm.get("ptx", ""), cubin=asm.get("cubin", b""), ttgir=asm.get("ttgir", ""),
    )

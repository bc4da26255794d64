"""What a compiled binary costs, read from the binary itself: ptxas's resource report, the SASS.

Tools: the ptxas and cuobjdump that ship inside Triton's wheel (no CUDA toolkit needed).

- ``ptxas -v`` on the PTX: registers, stack frame, spill stores / loads (bytes).
- ``cuobjdump -sass`` on the cubin: the instruction stream. Loops are found from backward branches;
  the *main loop* is the loop with the most instructions (nested loops counted in). Counted per
  binary: matrix instructions (``HGMMA``: wgmma, Hopper's warpgroup MMA; ``HMMA``: mma.sync),
  bulk-tensor (TMA) copies (``UTMALDG``/``UTMASTG``/``UBLKCP``), local-memory traffic
  (``LDL``/``STL``, i.e. spills).
- Occupancy: CTAs per SM from registers, shared memory and warps against the SM's limits.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

from .hardware import GPU

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\b(BRA|BRX)\b[^0-9]*0x([0-9a-f]+)")


@functools.lru_cache(maxsize=None)
def tool(name: str, cap: int = 90) -> str:
    """Path of ptxas (for capability ``cap``) or cuobjdump from the installed Triton."""
    from triton import knobs

    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            path = get_ptxas(cap).path
        except (ImportError, TypeError):  # pragma: no cover - older layouts
            path = knobs.nvidia.ptxas.path
    else:
        path = getattr(knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the Triton installation ({path!r})")
    return path


@dataclass
class PtxasReport:
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    barriers: int = 0


def ptxas_report(ptx: str, arch: str, cap: int) -> PtxasReport:
    """Run ``ptxas -v`` on ``ptx`` (as Triton does, output discarded) and parse its resource line."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [tool("ptxas", cap), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")]
        res = subprocess.run(base[:2] + ["--regAllocOptLevel=2"] + base[2:], capture_output=True, text=True)
        if res.returncode != 0:  # ptxas without that option
            res = subprocess.run(base, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{res.stderr[-2000:]}")
    log = res.stderr + res.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return PtxasReport(registers=num(r"Used (\d+) registers"), stack_frame=num(r"(\d+) bytes stack frame"),
                       spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                       barriers=num(r"used (\d+) barriers"))


def disassemble(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) for every SASS instruction of the cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr[-2000:]}")
    out = []
    for line in res.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(text: str) -> str:
    t = text.strip()
    if t.startswith("@"):
        t = t.split(None, 1)[1] if " " in t else t
    return t.split()[0] if t else ""


@dataclass
class Loop:
    start: int  # address of the first instruction
    end: int  # address of the backward branch
    instructions: int  # static count, nested loops included
    depth: int = 0


def find_loops(sass: list[tuple[int, str]]) -> list[Loop]:
    """Loops from backward branches (the self-branch that ends every kernel is not a loop)."""
    loops = []
    for i, (addr, text) in enumerate(sass):
        m = _BRANCH.search(text)
        if m and m.group(1) == "BRA":
            target = int(m.group(2), 16)
            if target < addr:
                n = sum(1 for a, _ in sass if target <= a <= addr)
                loops.append(Loop(target, addr, n))
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end)
    return loops


@dataclass
class SassStats:
    instructions: int
    main_loop: int  # instructions in the main loop (nested included); 0 if no loop
    loops: list = field(default_factory=list)
    hgmma: int = 0
    hmma: int = 0
    ffma: int = 0
    imad: int = 0
    tma: int = 0
    ldl: int = 0
    stl: int = 0
    ldl_bytes: int = 0
    stl_bytes: int = 0

    @property
    def mma_kind(self) -> str:
        return "wgmma" if self.hgmma else ("mma.sync" if self.hmma else ("fma" if self.ffma else "none"))


def _width(text: str) -> int:
    m = re.search(r"\.(32|64|128)\b", text.split()[0] if not text.startswith("@") else text.split()[1])
    return int(m.group(1)) // 8 if m else 4


def sass_stats(sass: list[tuple[int, str]]) -> SassStats:
    loops = find_loops(sass)
    main = max(loops, key=lambda lp: lp.instructions, default=None)
    st = SassStats(instructions=len(sass), main_loop=main.instructions if main else 0,
                   loops=[asdict(lp) for lp in loops])
    for _, text in sass:
        op = opcode(text)
        base = op.split(".")[0]
        if base == "HGMMA":
            st.hgmma += 1
        elif base == "HMMA":
            st.hmma += 1
        elif base == "FFMA":
            st.ffma += 1
        elif base == "IMAD":
            st.imad += 1
        elif base in ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UBLKRED", "UTMAREDG"):
            st.tma += 1
        elif base == "LDL":
            st.ldl += 1
            st.ldl_bytes += _width(text)
        elif base == "STL":
            st.stl += 1
            st.stl_bytes += _width(text)
    return st


def ctas_per_sm(registers: int, shared: int, num_warps: int, gpu: GPU) -> tuple[int, str]:
    """How many CTAs of this binary fit on one SM, and what limits it."""
    threads = 32 * num_warps
    # registers are allocated per warp in units of 256 (8 per thread, rounded up)
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * num_warps) if registers else gpu.max_ctas_per_sm
    by_smem = gpu.smem_per_sm // (shared + gpu.smem_reserved_per_cta) if shared else gpu.max_ctas_per_sm
    by_threads = gpu.max_threads_per_sm // threads
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
              "CTA slots": gpu.max_ctas_per_sm}
    which = min(limits, key=limits.get)
    return max(limits[which], 0), which


@dataclass
class BinaryReport:
    """Everything measured on one binary."""
    name: str
    target: str
    hash: str
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    ctas_per_sm: int
    occupancy_limit: str
    mma_kind: str
    tma: bool
    instructions: int
    main_loop_instructions: int
    hgmma: int
    hmma: int
    stl: int
    ldl: int
    loops: list

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads or self.stl or self.ldl)


def inspect_binary(binary, gpu: GPU) -> BinaryReport:
    from .compile import capability

    cap = capability(binary.target)
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    rep = ptxas_report(binary.ptx, arch, cap)
    st = sass_stats(disassemble(binary.cubin))
    ctas, limit = ctas_per_sm(rep.registers, binary.shared, binary.num_warps, gpu)
    return BinaryReport(
        name=binary.name, target=binary.target, hash=binary.hash, num_warps=binary.num_warps,
        num_stages=binary.num_stages, shared=binary.shared, registers=rep.registers,
        spill_stores=rep.spill_stores, spill_loads=rep.spill_loads, stack_frame=rep.stack_frame,
        ctas_per_sm=ctas, occupancy_limit=limit, mma_kind=st.mma_kind, tma=st.tma > 0,
        instructions=st.instructions, main_loop_instructions=st.main_loop, hgmma=st.hgmma, hmma=st.hmma,
        stl=st.stl, ldl=st.ldl, loops=st.loops,
    )

"""What the layer bench measures: :class:`Shape` (one LoRA / DoRA layer problem, on a dense or a 4-bit
frozen weight), the Llama-3-8B projections, the presets (``full``, ``quick``, ``cpu``, ``cpu-quick``)
and custom grids."""
from __future__ import annotations

from dataclasses import dataclass

import torch


LLAMA3_8B_PROJECTIONS = {  # name: (in_features K, out_features N)
    "q/o 4096→4096": (4096, 4096),
    "k/v 4096→1024": (4096, 1024),
    "gate/up 4096→14336": (4096, 14336),
    "down 14336→4096": (14336, 4096),
}
# The same four projections at 1/32 scale: small enough for the Triton interpreter.
SMALL_PROJECTIONS = {
    "q/o 128→128": (128, 128),
    "k/v 128→32": (128, 32),
    "gate/up 128→448": (128, 448),
    "down 448→128": (448, 128),
}


# ----------------------------------------------------------------------------------------- shapes

@dataclass
class Shape:
    name: str
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dropout_p: float
    dtype: str = "bfloat16"
    dora: bool = False
    quant: str | None = None  # None: a dense frozen weight; 'nf4' | 'fp4': the 4-bit providers' shape

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kind(self) -> str:
        return kind_label(self.dora, self.quant)

    def __str__(self) -> str:
        return f"{self.kind} {self.name} M={self.m} r={self.r} p={self.dropout_p} {self.dtype}"

    def flops(self, mode: str, provider: str | None = None) -> float:
        """Flops of the definition's GEMMs (no dW: W is frozen). The floors (``base``, ``bnb4-base``) count
        only x·Wᵀ and g·W (a 4-bit weight's dequantisation is not counted);
        DoRA with dropout adds PEFT's second product with W (forward and its dx)."""
        m, n, k, r = self.m, self.n, self.k, self.r
        if provider in ("base", "bnb4-base"):
            fwd, bwd = 2 * m * n * k, 2 * m * n * k
        else:
            fwd = 2 * m * n * k + 2 * m * r * (k + n)
            bwd = 2 * m * n * k + 4 * m * r * (k + n)  # dx GEMM; v, dB, dA, v·A
            if self.dora and self.dropout_p > 0:
                fwd, bwd = fwd + 2 * m * n * k, bwd + 2 * m * n * k
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def default_shapes(tokens=(2048, 8192, 16384), ranks=(16,), dropouts=(0.0, 0.1), extra_ranks=(8, 64),
                   projections=None, dtype="bfloat16"):
    """The GPU default: every projection at every token count (r = ranks[0], both dropout rates); the
    rank sweep (extra_ranks, p = 0.1) at the middle token count; DoRA (r = ranks[0], both rates) there too."""
    projections = projections or LLAMA3_8B_PROJECTIONS
    mid = tokens[len(tokens) // 2]
    shapes = [Shape(name, m, k, n, r, p, dtype) for name, (k, n) in projections.items()
              for m in tokens for p in dropouts for r in ranks]
    shapes += [Shape(name, mid, k, n, r, 0.1, dtype) for name, (k, n) in projections.items() for r in extra_ranks]
    shapes += [Shape(name, mid, k, n, ranks[0], p, dtype, dora=True)
               for name, (k, n) in projections.items() for p in dropouts]
    shapes += [Shape(name, mid, k, n, ranks[0], p, dtype, quant="nf4")
               for name, (k, n) in projections.items() for p in dropouts]
    return shapes


def quick_shapes(projections=None, tokens=(2048, 8192), dtype="bfloat16"):
    """``--quick`` on a GPU: every projection, r = 16; LoRA p = 0.1 at both token counts, p = 0 and
    DoRA p = 0.1 at the larger one; QLoRA (NF4) p = 0.1 at the larger one for q/o and gate/up. Most
    informative first (a time budget may cut the tail)."""
    projections = projections or LLAMA3_8B_PROJECTIONS
    big, small = max(tokens), min(tokens)
    shapes = [Shape(name, big, k, n, 16, 0.1, dtype) for name, (k, n) in projections.items()]
    shapes += [Shape(name, big, k, n, 16, 0.1, dtype, dora=True) for name, (k, n) in projections.items()]
    shapes += [Shape(name, big, k, n, 16, 0.1, dtype, quant="nf4")
               for name, (k, n) in list(projections.items())[::2]]
    shapes += [Shape(name, small, k, n, 16, 0.1, dtype) for name, (k, n) in projections.items() if small != big]
    shapes += [Shape(name, big, k, n, 16, 0.0, dtype) for name, (k, n) in projections.items()]
    return shapes


def cpu_shapes():
    """The CPU default: the Llama projections at 1/32 scale, fp32, r = 8, p = 0.1, at 32 and 128
    tokens, DoRA on two of them, and QLoRA (NF4) on q/o at 128 tokens (the Triton paths run in the
    interpreter: under a minute)."""
    shapes = [Shape(name, m, k, n, 8, 0.1, "float32") for name, (k, n) in SMALL_PROJECTIONS.items() for m in (32, 128)]
    shapes += [Shape(name, 32, k, n, 8, 0.1, "float32", dora=True)
               for name, (k, n) in list(SMALL_PROJECTIONS.items())[:2]]
    shapes += [Shape(name, 128, k, n, 8, 0.1, "float32", quant="nf4")
               for name, (k, n) in list(SMALL_PROJECTIONS.items())[:1]]
    return shapes


def cpu_quick_shapes():
    """``--quick`` on CPU: one LoRA, one DoRA and one QLoRA (NF4) tiny shape, p = 0.1 (seconds, in the
    interpreter)."""
    return [Shape("tiny 96→80", 64, 96, 80, 8, 0.1, "float32"),
            Shape("tiny 96→80", 64, 96, 80, 8, 0.1, "float32", dora=True),
            # in_features a multiple of 64: bitsandbytes' CPU dequantiser mis-scales 4-bit blocks that
            # straddle two rows when in_features is a multiple of 16 but not of the blocksize (e.g. 96)
            Shape("tiny 128→80", 64, 128, 80, 8, 0.1, "float32", quant="nf4")]


PRESETS = {
    "full": (default_shapes, "Llama-3-8B projections at 2048/8192/16384 tokens, r 8/16/64, p 0/0.1, bf16, "
                             "LoRA+DoRA+QLoRA (NF4)"),
    "quick": (quick_shapes, "Llama-3-8B projections, 2048/8192 tokens, r 16, bf16, LoRA+DoRA+QLoRA (NF4)"),
    "cpu": (cpu_shapes, "Llama projections at 1/32 scale, 32/128 tokens, r 8, p 0.1, fp32, LoRA+DoRA+QLoRA (NF4, q/o)"),
    "cpu-quick": (cpu_quick_shapes, "one tiny LoRA, one tiny DoRA and one tiny QLoRA (NF4) shape, fp32, p 0.1"),
}


def parse_projections(spec: str) -> dict[str, tuple[int, int]]:
    """'4096x1024,14336x4096' (in×out) or names of the Llama-3-8B projections ('q/o', 'down', ...)."""
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        named = [name for name in LLAMA3_8B_PROJECTIONS if name.split()[0] == item or name == item]
        if named:
            out[named[0]] = LLAMA3_8B_PROJECTIONS[named[0]]
            continue
        try:
            k, n = (int(v) for v in item.lower().replace("→", "x").split("x"))
        except ValueError:
            raise ValueError(f"projection {item!r}: expected IN x OUT (e.g. 4096x1024) or one of "
                             f"{[p.split()[0] for p in LLAMA3_8B_PROJECTIONS]}") from None
        out[f"{k}→{n}"] = (k, n)
    return out


def grid_shapes(projections, tokens, ranks, dropouts, dtypes, kinds=("lora",)):
    """The full cross product (what ``--projections/--tokens/--ranks/--dropouts/--dtypes/--kinds`` give)."""
    return [Shape(name, m, k, n, r, p, dt, dora=(kind == "dora"))
            for kind in kinds for name, (k, n) in projections.items() for m in tokens
            for r in ranks for p in dropouts for dt in dtypes]


def kind_label(dora: bool, quant: str | None) -> str:
    """'LoRA', 'DoRA', or with a 4-bit weight 'LoRA nf4', 'DoRA fp4' ..."""
    return ("DoRA" if dora else "LoRA") + (f" {quant}" if quant else "")


def with_quant(shapes: list[Shape], quants) -> list[Shape]:
    """``--quant``: every distinct shape (its 4-bit type aside) once per entry of ``quants`` ('none' for
    the dense weight, 'nf4', 'fp4'), in the shapes' order."""
    from dataclasses import replace

    bases = []
    for s in shapes:
        if replace(s, quant=None) not in bases:
            bases.append(replace(s, quant=None))
    return [replace(base, quant=None if q == "none" else q) for base in bases for q in quants]


def shape_key(sd: dict) -> tuple:
    return (kind_label(sd.get("dora"), sd.get("quant")), sd["name"], sd["m"], sd["k"], sd["n"], sd["r"],
            sd["dropout_p"], sd["dtype"])

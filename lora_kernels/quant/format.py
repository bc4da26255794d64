"""The 4-bit weight format: bitsandbytes' own layout, held in :class:`QuantizedWeight`.

Layout (bitsandbytes ``quantize_4bit`` / ``Params4bit``), for a weight W of shape (N, K):

- the N·K values are taken in row-major order and cut into blocks of ``blocksize`` consecutive
  values (64 by default; 32 ... 4096 accepted). Blocks run over the *flattened* weight, so when
  K is not a multiple of the blocksize a block straddles two (or more) rows;
- each value is replaced by a 4-bit index into a 16-entry code table (NF4 or FP4) after dividing
  it by its block's absolute maximum ``absmax[block]`` (fp32);
- ``packed`` holds two indices per byte, the *first* (even) element in the high nibble and the
  second (odd) one in the low nibble; ``ceil(N·K / 2)`` bytes (bnb stores them as a
  ``((N·K+1)//2, 1)`` uint8 tensor, or viewed as another ``quant_storage`` dtype);
- nested ("double") quantisation (bnb's ``compress_statistics=True``): the absmax vector itself is
  stored as 8-bit indices ``absmax`` (uint8) into a 256-entry signed dynamic code, blockwise with
  its own fp32 absmax (``nested.absmax``, blocksize 256), after subtracting ``nested.offset`` (the
  mean of the fp32 absmax). The fp32 absmax is recovered as ``code2[q] · absmax2[i // 256] + offset``.

Dequantised value: ``code[index] · absmax[block]`` computed in fp32, then rounded (to nearest even)
to the compute dtype. Every path of this package reproduces that bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# NF4 (QLoRA, Dettmers et al. 2023): the 16 quantiles of N(0, 1) normalised to [-1, 1], as
# bitsandbytes publishes them (its ``get_4bit_type('nf4')``; test_quant_bnb checks equality).
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by its maximum 12.
# Index 8 is +0 as in bitsandbytes (its table writes the integer -0).
_FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
               0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 code of ``quant_type`` ('nf4' or 'fp4'), computed as bitsandbytes does."""
    if quant_type == "nf4":
        values = _NF4_VALUES
    elif quant_type == "fp4":
        values = _FP4_VALUES
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    data = torch.tensor(values, dtype=torch.float32, device=device)
    return data.div_(data.abs().max())


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``, 256 sorted fp32
    values, the smallest -0.99297...), the code of bitsandbytes' nested absmax."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 256:  # pragma: no cover - a construction error
        raise AssertionError(f"dynamic code has {len(data)} entries")
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


@dataclass(eq=False)
class NestedAbsmax:
    """The double-quantisation state of the absmax vector.

    absmax: (ceil(blocks / blocksize),) fp32, the per-block maximum of |absmax − offset|.
    code: (256,) fp32 dynamic code. blocksize: nested blocksize (256 in bitsandbytes).
    offset: the fp32 mean of the original absmax (a 0-d fp32 tensor).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    offset: torch.Tensor


def _check_int(name, value, allowed=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value}")
    return value


class QuantizedWeight:
    """A frozen (N, K) weight in bitsandbytes' 4-bit format (see the module docstring).

    Attributes:
        packed: uint8 tensor with ceil(N·K/2) elements (any shape; bnb's is ((N·K+1)//2, 1)); read flat.
        absmax: (ceil(N·K/blocksize),) fp32, or uint8 indices when ``nested`` is set.
        shape: (N, K) = (out_features, in_features).
        quant_type: 'nf4' | 'fp4'. blocksize: values per absmax block.
        code: (16,) fp32 code table (bnb's ``quant_map``). dtype: the compute dtype (bnb's
            ``quant_state.dtype``: the dtype the weight had before quantisation).
        nested: :class:`NestedAbsmax` or None.

    No tensor is copied: a QuantizedWeight built from a bitsandbytes ``Params4bit`` shares its storage.
    It is not a torch.Tensor and has no gradient (frozen by construction).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, quant_type: str = "nf4",
                 blocksize: int = 64, code: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 nested: NestedAbsmax | None = None):
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _check_int("blocksize", blocksize, BLOCKSIZES)
        shape = tuple(shape)
        if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
            raise ValueError(f"shape must be (out_features, in_features) with positive ints, got {shape}")
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype (the compute dtype) must be one of {COMPUTE_DTYPES}, got {dtype}")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:
            if packed.dtype.is_floating_point or packed.dtype in (torch.int8, torch.int16, torch.int32):
                packed = packed.reshape(-1).view(torch.uint8)  # bnb's quant_storage: a reinterpretation
            else:
                raise TypeError(f"packed must hold uint8 bytes, got {packed.dtype}")
        numel = shape[0] * shape[1]
        n_bytes = (numel + 1) // 2
        if packed.numel() != n_bytes:
            raise ValueError(f"packed has {packed.numel()} bytes; a 4-bit weight of shape {shape} needs "
                             f"ceil({numel}/2) = {n_bytes}")
        blocks = math.ceil(numel / blocksize)
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"absmax must be a torch.Tensor, got {type(absmax).__name__}")
        if absmax.numel() != blocks:
            raise ValueError(f"absmax has {absmax.numel()} entries; shape {shape} with blocksize {blocksize} has "
                             f"ceil({numel}/{blocksize}) = {blocks} blocks (quant state does not match the packed data)")
        if nested is None and absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 (or uint8 with a nested state), got {absmax.dtype}")
        if nested is not None:
            if absmax.dtype != torch.uint8:
                raise TypeError(f"nested (double-quantised) absmax must be uint8 indices, got {absmax.dtype}")
            nbs = _check_int("nested.blocksize", nested.blocksize)
            if nbs <= 0:
                raise ValueError(f"nested.blocksize must be positive, got {nbs}")
            if nested.absmax.dtype != torch.float32 or nested.absmax.numel() != math.ceil(blocks / nbs):
                raise ValueError(f"nested.absmax must be float32 with ceil({blocks}/{nbs}) = {math.ceil(blocks / nbs)} "
                                 f"entries, got {nested.absmax.dtype} with {nested.absmax.numel()}")
            if nested.code.dtype != torch.float32 or nested.code.numel() != 256:
                raise ValueError(f"nested.code must be 256 float32 values, got {nested.code.dtype} with "
                                 f"{nested.code.numel()}")
            offset = nested.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
            if offset.numel() != 1:
                raise ValueError(f"nested.offset must be one value, got shape {tuple(offset.shape)}")
            nested = NestedAbsmax(nested.absmax.reshape(-1), nested.code.reshape(-1), nbs,
                                  offset.reshape(()).to(torch.float32))
        if code is None:
            code = code_table(quant_type, device=packed.device)
        if not isinstance(code, torch.Tensor) or code.numel() != 16 or code.dtype != torch.float32:
            raise ValueError(f"code must be 16 float32 values, got {getattr(code, 'dtype', type(code))} with "
                             f"{getattr(code, 'numel', lambda: '?')()} entries")
        tensors = [packed, absmax, code] + ([nested.absmax, nested.code, nested.offset] if nested else [])
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"all tensors of a QuantizedWeight must be on one device, got {sorted(map(str, devices))}")
        self.packed = packed
        self.absmax = absmax.reshape(-1)
        self.shape = torch.Size(shape)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.code = code.reshape(-1)
        self.dtype = dtype
        self.nested = nested

    # ---- metadata -----------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def requires_grad(self) -> bool:
        return False

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes held: packed data, absmax and (nested) statistics, code tables included."""
        tensors = [self.packed, self.absmax, self.code]
        if self.nested is not None:
            tensors += [self.nested.absmax, self.nested.code, self.nested.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (e.g. to register as buffers)."""
        out = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.nested is not None:
            out.update(nested_absmax=self.nested.absmax, nested_code=self.nested.code,
                       nested_offset=self.nested.offset)
        return out

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 absmax (undoing double quantisation the way bitsandbytes does)."""
        from .dequantize import dequantize_absmax

        return dequantize_absmax(self)

    # ---- conversions --------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """W (N, K) in ``dtype`` (default: the compute dtype), equal to bitsandbytes' dequantize_4bit."""
        from .dequantize import dequantize

        return dequantize(self, dtype, out=out)

    def float(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (a no-op returning self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        nested = None
        if self.nested is not None:
            n = self.nested
            nested = NestedAbsmax(n.absmax.to(device), n.code.to(device), n.blocksize, n.offset.to(device))
        return QuantizedWeight(self.packed.to(device), self.absmax.to(device), self.shape, self.quant_type,
                               self.blocksize, self.code.to(device), self.dtype, nested)

    @classmethod
    def from_float(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                   compress_statistics: bool = False, dtype: torch.dtype | None = None) -> "QuantizedWeight":
        """Quantise ``weight`` (N, K) with lora_kernels' own quantiser (bytes equal to bitsandbytes')."""
        from .quantize import quantize

        return quantize(weight, quant_type, blocksize, compress_statistics, dtype=dtype)

    @classmethod
    def from_bnb(cls, param, quant_state=None) -> "QuantizedWeight":
        """From a bitsandbytes ``Params4bit`` (or packed data plus a ``QuantState``), sharing storage."""
        from .from_bnb import from_bnb

        return from_bnb(param, quant_state)

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.nested.blocksize})" if self.nested is not None else ""
        return (f"QuantizedWeight(shape={tuple(self.shape)}, {self.quant_type}, blocksize={self.blocksize}, "
                f"dtype={str(self.dtype)[6:]}{nested}, device={self.device})")

"""Regenerate tests/data/bnb_4bit_golden.pt: small weights quantised and dequantised by bitsandbytes.

    python tests/make_quant_golden.py          (needs bitsandbytes; run from the repository root)

The file lets tests/test_quant.py check lora_kernels' quantiser and dequantiser against
bitsandbytes' bytes and values on machines without bitsandbytes. Everything in it comes from
bitsandbytes' own functions: ``quantize_4bit`` (packed bytes, fp32 absmax), its reference (torch)
blockwise kernel for the nested absmax (bitsandbytes' CPU C kernel differs from it on rare
near-ties, see lora_kernels/quant/quantize.py), and its reference ``dequantize_4bit`` computation.
"""
from __future__ import annotations

import itertools
import logging
import pathlib

import torch

OUT = pathlib.Path(__file__).parent / "data" / "bnb_4bit_golden.pt"
SHAPES = [(13, 40), (3, 130), (8, 64)]  # 13·40 = 520: blocks straddle rows; 3·130 odd tail block


def main() -> None:
    logging.disable(logging.WARNING)
    import bitsandbytes
    import bitsandbytes.functional as BF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    gen = torch.Generator().manual_seed(20260317)
    cases = []
    for qt, bs, nested, shape in itertools.product(("nf4", "fp4"), (64, 128), (False, True), SHAPES):
        w = (torch.randn(shape, generator=gen) * 0.05).float()
        w.view(-1)[:3] = 0.0  # exact zeros: FP4's two zero codes
        packed, state = BF.quantize_4bit(w, blocksize=bs, compress_statistics=False, quant_type=qt)
        case = dict(quant_type=qt, blocksize=bs, nested=nested, weight=w, packed=packed.reshape(-1).clone(),
                    absmax=state.absmax.clone())
        absmax = state.absmax
        if nested:
            code2 = BF.create_dynamic_map()
            offset = absmax.mean()
            q2, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                reference, absmax - offset, code2, 256)
            case.update(qabsmax=q2.clone(), absmax2=absmax2.clone(), code2=code2, offset=offset.clone())
            absmax = BF.dequantize_blockwise(q2, absmax=absmax2, code=code2, blocksize=256) + offset
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            out = _dequantize_4bit_compute(packed.reshape(-1), absmax, BF.get_4bit_type(qt, "cpu"), bs, shape, dt)
            case[f"dequant_{str(dt)[6:]}"] = out.clone()
        cases.append(case)
    OUT.parent.mkdir(exist_ok=True)
    torch.save({"bitsandbytes": bitsandbytes.__version__, "cases": cases}, OUT)
    print(f"wrote {len(cases)} cases to {OUT} (bitsandbytes {bitsandbytes.__version__})")


if __name__ == "__main__":
    main()

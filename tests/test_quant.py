"""lora_kernels.quant without bitsandbytes: the format, the quantiser and the dequantiser against
golden vectors made by bitsandbytes (tests/make_quant_golden.py), plus properties and bad input.
(tests/test_quant_bnb.py compares with a live bitsandbytes on fresh random weights.)"""
import pathlib

import pytest
import torch

from lora_kernels.quant import NestedAbsmax, QuantizedWeight, code_table, dequantize, dynamic_code, quantize

GOLDEN = pathlib.Path(__file__).parent / "data" / "bnb_4bit_golden.pt"


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _cases():
    return torch.load(GOLDEN, weights_only=True)["cases"]


def _name(c):
    return f"{c['quant_type']}-bs{c['blocksize']}-{'nested' if c['nested'] else 'plain'}-{tuple(c['weight'].shape)}"


@pytest.mark.parametrize("case", _cases(), ids=_name)
def test_quantize_equals_bitsandbytes_golden(case):
    qw = quantize(case["weight"], case["quant_type"], case["blocksize"], compress_statistics=case["nested"])
    assert torch.equal(qw.packed.reshape(-1), case["packed"])
    if case["nested"]:
        assert torch.equal(qw.absmax, case["qabsmax"])
        assert torch.equal(qw.nested.absmax, case["absmax2"])
        assert torch.equal(qw.nested.code, case["code2"])
        assert torch.equal(_bits(qw.nested.offset.reshape(1)), _bits(case["offset"].reshape(1)))
    else:
        assert torch.equal(_bits(qw.absmax), _bits(case["absmax"]))


@pytest.mark.parametrize("case", _cases(), ids=_name)
def test_dequantize_equals_bitsandbytes_golden(case):
    """Built from bitsandbytes' stored bytes (not our quantiser), so the dequantiser is tested alone."""
    shape = tuple(case["weight"].shape)
    if case["nested"]:
        nested = NestedAbsmax(case["absmax2"], case["code2"], 256, case["offset"])
        qw = QuantizedWeight(case["packed"], case["qabsmax"], shape, case["quant_type"], case["blocksize"],
                             nested=nested, dtype=torch.float32)
    else:
        qw = QuantizedWeight(case["packed"], case["absmax"], shape, case["quant_type"], case["blocksize"],
                             dtype=torch.float32)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(_bits(dequantize(qw, dt)), _bits(case[f"dequant_{str(dt)[6:]}"])), dt


def test_code_tables():
    nf4, fp4 = code_table("nf4"), code_table("fp4")
    assert nf4[0] == -1 and nf4[15] == 1 and nf4[7] == 0 and torch.all(nf4[1:] > nf4[:-1])
    assert fp4[3] == 1 and fp4[11] == -1 and fp4[0] == 0 and fp4[8] == 0 and not torch.signbit(fp4[8])
    dyn = dynamic_code()
    assert dyn.numel() == 256 and torch.all(dyn[1:] > dyn[:-1]) and dyn[-1] == 1.0 and (dyn == 0).sum() == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_round_trip_error_bounded_by_code_spacing(quant_type, nested):
    """|W − deq(q(W))| ≤ half the widest code gap × the block absmax (plus the nested absmax error)."""
    w = torch.randn(37, 70) * 0.02
    qw = quantize(w, quant_type, 64, compress_statistics=nested)
    back = dequantize(qw, torch.float32)
    code = torch.sort(code_table(quant_type)).values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    flat = w.reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, 64 - flat.numel() % 64)).view(-1, 64).abs().amax(1)
    bound = blocks.repeat_interleave(64)[: flat.numel()] * half_gap * (1.02 if nested else 1.0) + 1e-7
    assert torch.all((back.reshape(-1) - flat).abs() <= bound)


def test_block_straddling_rows():
    """K = 40 with blocksize 64: block 0 covers row 0 and most of row 1. Scaling row 1 only changes
    the absmax of the blocks it touches, and the dequantised value of row 0's tail follows."""
    w = torch.randn(4, 40)
    w[1] *= 100.0
    qw = quantize(w, "nf4", 64)
    assert qw.absmax.numel() == 3
    assert torch.isclose(qw.absmax[0], w.reshape(-1)[:64].abs().max())
    assert torch.isclose(qw.absmax[1], w.reshape(-1)[64:128].abs().max())
    back = dequantize(qw, torch.float32)
    # row 0 lies in block 0, whose absmax is row 1's: its small values quantise coarsely (mostly to 0)
    assert (back[0] == 0).sum() > 20


def test_dequantize_into_scratch_and_dtypes():
    w = torch.randn(9, 30)
    qw = quantize(w, "fp4", 128, True)
    out = torch.full((9, 30), float("nan"), dtype=torch.bfloat16)
    assert dequantize(qw, torch.bfloat16, out=out) is out
    assert torch.equal(out, dequantize(qw, torch.bfloat16))
    assert torch.equal(dequantize(qw, torch.float64), dequantize(qw, torch.float32).double())
    assert qw.dtype == torch.float32 and qw.float().dtype == torch.float32
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize(qw, torch.float32, out=torch.empty(30, 9))


def test_bad_input_errors():
    w = torch.randn(8, 16)
    qw = quantize(w, "nf4", 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize(w, "nf4", 48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize(w, "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(16))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="packed has 64 bytes"):
        QuantizedWeight(qw.packed, qw.absmax, (8, 17), "nf4", 64)  # wrong shape for the packed data
    with pytest.raises(ValueError, match="quant state does not match"):
        QuantizedWeight(qw.packed, qw.absmax, (8, 16), "nf4", 32)  # wrong blocksize for the absmax
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QuantizedWeight(qw.packed, qw.absmax, (8, 16), "nf4", 100)
    with pytest.raises(TypeError, match="absmax must be float32"):
        QuantizedWeight(qw.packed, qw.absmax.half(), (8, 16), "nf4", 64)
    nq = quantize(torch.randn(40, 40), "nf4", 64, True)
    with pytest.raises(ValueError, match="nested.absmax"):
        QuantizedWeight(nq.packed, nq.absmax, (40, 40), "nf4", 64,
                        nested=NestedAbsmax(torch.zeros(5), nq.nested.code, 256, nq.nested.offset))
    with pytest.raises(TypeError, match="nested"):
        QuantizedWeight(nq.packed, nq.absmax_fp32(), (40, 40), "nf4", 64, nested=nq.nested)

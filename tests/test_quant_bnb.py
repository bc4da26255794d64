"""lora_kernels.quant against a live bitsandbytes (the optional ``qlora`` extra) on fresh random weights.

Needs bitsandbytes (``pip install lora-kernels[qlora]``); without it this module is skipped as a
whole — tests/test_quant.py covers the same equalities from stored bitsandbytes outputs.
"""
import itertools
import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="optional extra: pip install bitsandbytes (lora-kernels[qlora])")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as BF  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from lora_kernels.quant import QuantizedWeight, code_table, dequantize, dynamic_code, from_bnb, quantize  # noqa: E402
from lora_kernels.quant.from_bnb import to_bnb_quant_state  # noqa: E402

# bitsandbytes' reference (torch) kernels, reached past its CPU C kernels
_REFERENCE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
SHAPES = [(37, 50), (33, 129), (64, 64), (300, 258)]
CONFIGS = list(itertools.product(["nf4", "fp4"], [64, 128], [torch.float32, torch.bfloat16, torch.float16]))


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(code_table("nf4"), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(_bits(code_table("fp4")), _bits(BF.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(dynamic_code(), BF.create_dynamic_map())


@pytest.mark.parametrize("quant_type,blocksize,dtype", CONFIGS)
def test_quantize_bytes_equal_bitsandbytes(quant_type, blocksize, dtype):
    for shape in SHAPES:
        w = (torch.randn(shape) * 0.05).to(dtype)
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
        qw = quantize(w, quant_type, blocksize)
        assert torch.equal(qw.packed.reshape(-1), packed.reshape(-1)), shape
        assert torch.equal(_bits(qw.absmax), _bits(state.absmax)), shape
        assert qw.dtype == state.dtype


@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 128)])
def test_nested_statistics_equal_bitsandbytes(quant_type, blocksize):
    """Equal to bitsandbytes' reference blockwise kernel; its CPU C kernel (what quantize_4bit calls
    here) differs only on near-ties, by one code step, in a small fraction of the absmax entries."""
    w = torch.randn(300, 258) * 0.05
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    qw = quantize(w, quant_type, blocksize, compress_statistics=True)
    assert torch.equal(qw.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(qw.nested.absmax, state.state2.absmax)
    assert torch.equal(qw.nested.code, state.state2.code)
    assert qw.nested.blocksize == state.state2.blocksize
    assert torch.equal(_bits(qw.nested.offset.reshape(1)), _bits(state.offset.reshape(1)))
    plain = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)[1].absmax
    offset = plain.mean()
    q_ref, absmax2_ref = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        _REFERENCE, plain - offset, BF.create_dynamic_map(), 256)
    assert torch.equal(qw.absmax, q_ref) and torch.equal(qw.nested.absmax, absmax2_ref)
    diff = (qw.absmax.int() - state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("quant_type,blocksize,dtype", CONFIGS)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_equals_bitsandbytes(quant_type, blocksize, dtype, nested):
    for shape in SHAPES:
        w = torch.randn(shape) * 0.05
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        state.dtype = dtype
        qw = from_bnb(packed, state)
        mine = dequantize(qw)
        assert mine.dtype == dtype
        absmax = state.absmax if not nested else BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        ref = _dequantize_4bit_compute(packed.reshape(-1), absmax, BF.get_4bit_type(quant_type, "cpu"), blocksize,
                                       shape, dtype)
        assert torch.equal(_bits(mine), _bits(ref)), shape  # bit for bit, zeros' signs included
        if shape[1] % 16 == 0 and shape[1] % blocksize != 0:
            # bitsandbytes' CPU C kernel (its vectorised path, in_features a multiple of 16) mis-scales
            # blocks that straddle rows (e.g. in_features 64 with blocksize 128, or 32, 48, 96 with
            # 64; test_bnb_cpu_kernel_straddling_bug): its own reference computation above is the
            # oracle for this layout.
            continue
        # the public API (CPU C kernel); FP4's zero code comes out as -0 there: equal as values
        assert torch.equal(mine, BF.dequantize_4bit(packed, state)), shape


def test_from_params4bit_shares_storage_and_linear4bit_forward():
    lin = torch.nn.Linear(70, 24, bias=True)
    layer = bnb.nn.Linear4bit(70, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # quantises
    qw = from_bnb(layer.weight)
    assert qw.packed.data_ptr() == layer.weight.data_ptr()
    assert qw.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert qw.shape == (24, 70) and qw.nested is not None
    assert torch.equal(dequantize(qw, torch.float32), BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    layer.train()
    x = torch.randn(5, 70)
    y = torch.nn.functional.linear(x, dequantize(qw, torch.float32), layer.bias)
    torch.testing.assert_close(layer(x), y)


def test_quant_storage_and_round_trip_to_bnb_state():
    w = torch.randn(16, 64)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="fp4", quant_storage=torch.bfloat16)
    qw = from_bnb(packed, state)
    assert qw.packed.dtype == torch.uint8 and qw.packed.data_ptr() == packed.data_ptr()
    back = to_bnb_quant_state(quantize(w, "nf4", 64, True))
    assert torch.equal(BF.dequantize_4bit(quantize(w, "nf4", 64, True).packed, back),
                       dequantize(quantize(w, "nf4", 64, True)))


def test_bad_bnb_state_refused():
    w = torch.randn(16, 64)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state.shape = torch.Size([16, 66])
    with pytest.raises(ValueError, match="packed has 512 bytes"):
        from_bnb(packed, state)
    state.shape = torch.Size([16, 64])
    state.blocksize = 128
    with pytest.raises(ValueError, match="quant state does not match"):
        from_bnb(packed, state)
    with pytest.raises(ValueError, match="no quant_state"):
        from_bnb(bnb.nn.Params4bit(w, quant_type="nf4"))
    assert isinstance(QuantizedWeight.from_bnb(packed, BF.quantize_4bit(w, quant_type="nf4")[1]), QuantizedWeight)


def test_bnb_cpu_kernel_straddling_bug_is_where_we_say():
    """Documents the bitsandbytes CPU-kernel discrepancy the comparisons above step around: for
    in_features a multiple of 16 but not of the blocksize, bnb.functional.dequantize_4bit on CPU
    disagrees with bitsandbytes' own reference computation (and with us); elsewhere it agrees.
    If a bitsandbytes release fixes it, this test fails and the exclusion above can go."""
    for k, blocksize in [(48, 64), (96, 64), (64, 128), (50, 64), (100, 64), (128, 64)]:
        w = torch.randn(10, k)
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        agrees = torch.equal(BF.dequantize_4bit(packed, state), dequantize(from_bnb(packed, state)))
        assert agrees == (not (k % 16 == 0 and k % blocksize != 0)), (k, blocksize)

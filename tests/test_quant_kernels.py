"""The Triton 4-bit dequantisation kernel (lora_kernels.kernels.dequant) against the plain-PyTorch
dequantiser, bit for bit (in the interpreter on CPU, natively on CUDA)."""
import pytest
import torch

from lora_kernels.quant import dequantize, quantize

pytestmark = pytest.mark.interpreter


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("quant_type,blocksize,nested,shape", [
    ("nf4", 64, False, (37, 50)),      # blocks straddle rows (K = 50 < 64)
    ("nf4", 128, True, (33, 129)),     # odd N·K: half a byte of padding, partial last block
    ("fp4", 64, True, (300, 257)),     # nested blocks (256 absmax per nested block) cross too
    ("fp4", 128, False, (16, 384)),    # K a multiple of the blocksize
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_kernel_bitwise_equal(kernel_device, quant_type, blocksize, nested, shape, dtype):
    from lora_kernels.kernels.dequant import dequant_4bit

    w = torch.randn(shape) * 0.05
    w.view(-1)[:4] = 0.0
    qw = quantize(w, quant_type, blocksize, compress_statistics=nested).to(kernel_device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)
    dequant_4bit(qw, out)
    assert torch.equal(_bits(out.cpu()), _bits(dequantize(qw.to("cpu"), dtype)))


def test_dequant_kernel_rejects_bad_output(kernel_device):
    from lora_kernels.kernels.dequant import dequant_4bit

    qw = quantize(torch.randn(8, 64), "nf4", 64).to(kernel_device)
    with pytest.raises(ValueError, match="contiguous"):
        dequant_4bit(qw, torch.empty(64, 8, device=kernel_device).t())
    with pytest.raises(TypeError, match="writes"):
        dequant_4bit(qw, torch.empty(8, 64, dtype=torch.float64, device=kernel_device))

"""lora_linear / dora_linear with a 4-bit QuantizedWeight (lora_kernels.qlora): every backend against
the float64 reference on the dequantised weight, exact equality with the dense path on the torch
backend, nothing N×K saved for backward, and bad input."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.quant import dequantize, quantize
from lora_kernels.testing import TOLERANCES, LoraCase, make_inputs, rel_error, run_path, run_reference


def _quantized_inputs(case, quant_type, blocksize, nested, device="cpu"):
    inputs = make_inputs(case, "cpu")
    x, weight, a, b, bias, g, mag = inputs
    qw = quantize(weight, quant_type, blocksize, compress_statistics=nested)
    dense = dequantize(qw, case.dtype)  # what every path computes with
    to = (lambda t: t.to(device) if t is not None else None)
    return (to(x), qw.to(device), to(a), to(b), to(bias), to(g), to(mag)), (x, dense, a, b, bias, g, mag)


def _check(backend, case, quant_type, blocksize, nested, device="cpu"):
    q_inputs, dense_inputs = _quantized_inputs(case, quant_type, blocksize, nested, device)
    out = run_path(backend, case, q_inputs)
    ref = run_reference(case, dense_inputs)
    tol = TOLERANCES[case.dtype]
    errors = {k: rel_error(out[k].cpu(), ref[k]) for k in ref}
    assert all(e <= tol for e in errors.values()), errors
    return out, dense_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [False, True])
def test_torch_backend_equals_dense_path_exactly(dtype, dora):
    """Same arithmetic as the dense torch backend on W = deq(Q): bitwise equal outputs and grads."""
    case = LoraCase(m=19, n=37, k=50, r=8, dtype=dtype, dropout_p=0.25, dora=dora)
    out, dense_inputs = _check("torch", case, "nf4", 64, True)
    dense = run_path("torch", case, dense_inputs)
    for k in out:
        assert torch.equal(out[k], dense[k]), k


@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, False), ("fp4", 128, True), ("fp4", 64, False),
                                                         ("nf4", 128, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_against_reference(quant_type, blocksize, nested, bias):
    for dtype in (torch.float32, torch.bfloat16):
        _check("torch", LoraCase(m=17, n=33, k=70, r=4, dtype=dtype, bias=bias, dropout_p=0.1, batch=2),
               quant_type, blocksize, nested)


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["hybrid", "fused"])
@pytest.mark.parametrize("quant_type,blocksize,nested,dtype,bias,dora,p", [
    ("nf4", 64, False, torch.float32, True, False, 0.0),
    ("nf4", 64, True, torch.bfloat16, False, False, 0.2),
    ("fp4", 128, True, torch.float16, True, False, 0.0),
    ("fp4", 64, False, torch.bfloat16, True, True, 0.0),
    ("nf4", 128, True, torch.float32, False, True, 0.2),
])
def test_triton_paths_against_reference(kernel_device, path, quant_type, blocksize, nested, dtype, bias, dora, p):
    case = LoraCase(m=24, n=40, k=72, r=8, dtype=dtype, bias=bias, dora=dora, dropout_p=p)  # K=72: blocks straddle rows
    _check(path, case, quant_type, blocksize, nested, device=kernel_device)


@pytest.mark.interpreter
def test_triton_hybrid_equals_dense_hybrid_bitwise(kernel_device):
    """The Triton dequantiser is bit-exact, so the 4-bit hybrid path is the dense hybrid path on deq(Q)."""
    case = LoraCase(m=16, n=40, k=72, r=4, dtype=torch.bfloat16, dropout_p=0.2)
    q_inputs, dense_inputs = _quantized_inputs(case, "fp4", 64, True, device=kernel_device)
    out = run_path("hybrid", case, q_inputs)
    dense = run_path("hybrid", case, tuple(t.to(kernel_device) if t is not None else None for t in dense_inputs))
    for k in out:
        assert torch.equal(out[k], dense[k]), k


def test_dequantised_weight_never_saved_for_backward():
    case = LoraCase(m=8, n=48, k=64, r=4, dropout_p=0.1)
    for dora in (False, True):
        case.dora = dora
        (x, qw, a, b, bias, g, mag), _ = _quantized_inputs(case, "nf4", 64, True)
        x.requires_grad_(True)
        a.requires_grad_(True)
        b.requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if dora:
                y = lk.dora_linear(x, qw, a, b, mag.requires_grad_(True), case.scale, bias=bias, dropout_p=0.1, seed=3)
            else:
                y = lk.lora_linear(x, qw, a, b, case.scale, bias=bias, dropout_p=0.1, seed=3)
        assert saved and all(t.numel() < case.n * case.k for t in saved if t.dim() > 0 and t.shape != x.shape), \
            [tuple(t.shape) for t in saved]
        assert not any(t.shape == (case.n, case.k) for t in saved)
        y.backward(g)
        assert x.grad is not None and a.grad is not None


def test_bad_input():
    qw = quantize(torch.randn(16, 32), "nf4", 64)
    x = torch.randn(4, 32)
    a, b = torch.randn(2, 32), torch.zeros(16, 2)
    with pytest.raises(ValueError, match="weight's in_features"):
        lk.lora_linear(torch.randn(4, 30), qw, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_b must have shape"):
        lk.lora_linear(x, qw, a, torch.zeros(15, 2), 1.0)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        lk.dora_linear(x, qw, a, b, torch.ones(15), 1.0)
    with pytest.raises(ValueError, match="one device"):
        lk.lora_linear(x.to("meta"), qw, a.to("meta"), b.to("meta"), 1.0)


def test_autocast_and_float64():
    qw = quantize(torch.randn(16, 32), "fp4", 64, True)
    x = torch.randn(3, 5, 32)
    a, b = torch.randn(2, 32), torch.randn(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.lora_linear(x, qw, a, b, 0.5)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 16)
    y64 = lk.lora_linear(x.double(), qw, a.double(), b.double(), 0.5)
    ref = lk.lora_linear_ref(x.double(), dequantize(qw, torch.float64), a.double(), b.double(), 0.5)
    torch.testing.assert_close(y64, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("hybrid", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("inference_first", [True, False])
def test_scratch_buffer_serves_inference_mode_and_training_in_either_order(backend, inference_first, request):
    """The shared scratch buffer is a normal tensor even when first allocated under torch.inference_mode:
    a later training (or no_grad) call writes it in place, and an inference-mode call after training
    reuses the training-made buffer. Both give the reference's results."""
    from lora_kernels import qlora

    device = request.getfixturevalue("kernel_device") if backend != "torch" else "cpu"
    torch.manual_seed(0)
    qw = quantize(torch.randn(40, 64), "nf4", 64).to(device)
    dense = dequantize(qw.to("cpu"), torch.float32).double()
    a = torch.randn(4, 64, device=device, requires_grad=True)
    b = torch.randn(40, 4, device=device, requires_grad=True)
    x = torch.randn(3, 64, device=device)
    expect = (x.cpu().double() @ dense.T + 2.0 * (x.cpu().double() @ a.detach().cpu().double().T)
              @ b.detach().cpu().double().T)
    tol = TOLERANCES[torch.float32]

    def inference():
        with torch.inference_mode():
            y = lk.lora_linear(x, qw, a, b, 2.0, backend=backend)
        assert rel_error(y.cpu(), expect) <= tol

    def training():
        y = lk.lora_linear(x, qw, a, b, 2.0, backend=backend)
        y.sum().backward()
        assert rel_error(y.detach().cpu(), expect) <= tol
        with torch.no_grad():
            assert rel_error(lk.lora_linear(x, qw, a, b, 2.0, backend=backend).cpu(), expect) <= tol

    qlora.release_scratch()
    try:
        for step in ((inference, training, inference) if inference_first else (training, inference, training)):
            step()
    finally:
        qlora.release_scratch()

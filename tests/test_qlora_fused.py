"""The fused QLoRA path: the 4-bit weight decoded inside the GEMM loops (lora_kernels.kernels.dequant.load_w4
in the forward GEMM, the dx GEMM and DoRA's norm), never dequantised into memory.

Every case: forward and all gradients against the float64 reference on the dequantised weight, and
bit for bit equal to the dense fused path on W = deq(Q) (the decoded tile equals the reference
dequantiser bit for bit in the compute dtype, so the GEMMs see the same operands; dropout uses the
same seed, hence the same mask). Gradients are NaN-poisoned (lora_kernels.testing.run_path)."""
import pickle

import pytest
import torch

from lora_kernels import qlora
from lora_kernels.quant import dequantize, quantize
from lora_kernels.testing import TOLERANCES, LoraCase, make_inputs, rel_error, run_path, run_reference

pytestmark = pytest.mark.interpreter


def _inputs(case, quant_type, blocksize, nested, device):
    x, weight, a, b, bias, g, mag = make_inputs(case, "cpu")
    qw = quantize(weight.float(), quant_type, blocksize, compress_statistics=nested)
    dense = dequantize(qw, case.dtype)
    if case.dora:  # the magnitude away from init, on the dequantised weight's norm
        from lora_kernels.reference import dora_weight_norm_ref

        norm = dora_weight_norm_ref(dense.double(), a.double(), b.double(), case.scale)
        mag = (norm * (1 + 0.3 * torch.rand(case.n, generator=torch.Generator().manual_seed(7),
                                            dtype=torch.float64))).to(case.dtype)
    to = (lambda t: t.to(device) if t is not None else None)
    q_inputs = (to(x), qw.to(device), to(a), to(b), to(bias), to(g), to(mag))
    dense_inputs = (to(x), to(dense), to(a), to(b), to(bias), to(g), to(mag))
    return q_inputs, dense_inputs


def _no_scratch(monkeypatch):
    """Make any dequantisation into memory on the fused path fail loudly."""
    qlora.release_scratch()

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path dequantised the 4-bit weight into memory")

    monkeypatch.setattr(qlora, "dequantize_weight", refuse)
    monkeypatch.setattr(qlora, "scratch_buffer", refuse)


# (quant_type, blocksize, nested, M, N, K, r, dtype, bias, p, dora)
CASES = [
    ("nf4", 64, False, 24, 40, 72, 8, torch.float32, True, 0.0, False),     # K=72: blocks straddle rows
    ("nf4", 64, True, 17, 33, 100, 5, torch.bfloat16, False, 0.2, False),   # odd N, odd r, K % 64 != 0
    ("fp4", 128, True, 20, 37, 136, 3, torch.float16, True, 0.1, False),    # K not a multiple of 128 or BLOCK_K
    ("fp4", 64, False, 9, 65, 48, 16, torch.bfloat16, True, 0.0, False),    # K < blocksize: blocks span rows
    ("nf4", 128, False, 12, 31, 200, 12, torch.float32, False, 0.3, False),
    ("fp4", 64, True, 16, 29, 80, 1, torch.float16, False, 0.0, False),     # rank 1
    ("nf4", 64, True, 16, 40, 72, 8, torch.bfloat16, True, 0.0, True),      # DoRA, norm streamed from 4 bits
    ("fp4", 128, False, 14, 33, 136, 4, torch.float32, False, 0.2, True),   # DoRA with dropout
    ("nf4", 64, False, 10, 27, 90, 7, torch.float16, True, 0.1, True),
    # odd K: rows start mid-byte, so the kernels decode element by element (no byte pairs)
    ("nf4", 64, True, 13, 35, 75, 6, torch.bfloat16, True, 0.1, False),
    ("fp4", 128, False, 11, 33, 129, 3, torch.float32, False, 0.0, True),
    ("fp4", 64, True, 9, 21, 33, 2, torch.float16, True, 0.2, True),
]


@pytest.mark.parametrize("quant_type,blocksize,nested,m,n,k,r,dtype,bias,p,dora", CASES)
def test_fused_against_reference_and_dense_fused(monkeypatch, kernel_device, quant_type, blocksize, nested, m, n, k,
                                                 r, dtype, bias, p, dora):
    case = LoraCase(m=m, n=n, k=k, r=r, dtype=dtype, bias=bias, dropout_p=p, dora=dora, seed=4321 + m)
    q_inputs, dense_inputs = _inputs(case, quant_type, blocksize, nested, kernel_device)
    dense = run_path("fused", case, dense_inputs)  # the dense fused path on deq(Q), before the patch
    _no_scratch(monkeypatch)
    out = run_path("fused", case, q_inputs)
    assert qlora._SCRATCH == {}
    ref = run_reference(case, dense_inputs)
    tol = TOLERANCES[dtype]
    errors = {key: rel_error(out[key].cpu(), ref[key]) for key in ref}
    assert all(e <= tol for e in errors.values()), errors
    for key in ref:
        assert torch.equal(out[key], dense[key]), key


@pytest.mark.parametrize("quant_type,nested,dtype", [("nf4", True, torch.bfloat16), ("fp4", False, torch.float16),
                                                     ("nf4", False, torch.float32)])
@pytest.mark.parametrize("k", [100, 101])  # K even (byte pairs) and odd (element by element)
def test_decoded_tile_bitwise_equal_to_reference(kernel_device, quant_type, nested, dtype, k):
    """The forward GEMM with x = I returns Wᵀ's columns: x·deq(Q)ᵀ with an identity x is deq(Q) itself
    (one nonzero product per output, exact in fp32), so the decoded tiles are the dequantiser's bits."""
    from lora_kernels.kernels.linear_fwd import lora_linear_fwd

    n = 33  # blocks straddle rows, K not a multiple of BLOCK_K
    w = torch.randn(n, k) * 0.05
    qw = quantize(w, quant_type, 64, compress_statistics=nested).to(kernel_device)
    x = torch.eye(k, dtype=dtype, device=kernel_device)
    u = torch.zeros(k, 16, dtype=dtype, device=kernel_device)
    b = torch.zeros(n, 16, dtype=dtype, device=kernel_device)
    y = lora_linear_fwd(x, qw, None, u, b, 1.0)
    assert torch.equal(y.t().cpu(), dequantize(qw.to("cpu"), dtype))


def test_dora_norm_streamed_from_4bit(kernel_device):
    from lora_kernels.kernels.dora import dora_weight_norm

    qw = quantize(torch.randn(37, 72) * 0.1, "nf4", 64, compress_statistics=True).to(kernel_device)
    a = torch.randn(4, 72, dtype=torch.bfloat16, device=kernel_device) * 0.1
    b = torch.randn(37, 4, dtype=torch.bfloat16, device=kernel_device) * 0.1
    dense = dequantize(qw, torch.bfloat16)
    assert torch.equal(dora_weight_norm(qw, a, b, 2.0), dora_weight_norm(dense, a, b, 2.0))


def test_fused_3d_and_noncontiguous_input(monkeypatch, kernel_device):
    case = LoraCase(m=6, n=40, k=72, r=4, dtype=torch.bfloat16, dropout_p=0.1, batch=3, noncontiguous=True)
    q_inputs, dense_inputs = _inputs(case, "nf4", 64, True, kernel_device)
    _no_scratch(monkeypatch)
    out = run_path("fused", case, q_inputs)
    ref = run_reference(case, dense_inputs)
    errors = {key: rel_error(out[key].cpu(), ref[key]) for key in ref}
    assert all(e <= TOLERANCES[case.dtype] for e in errors.values()), errors


def test_hybrid_still_uses_the_scratch(kernel_device):
    case = LoraCase(m=8, n=40, k=72, r=4, dtype=torch.bfloat16)
    q_inputs, _ = _inputs(case, "nf4", 64, False, kernel_device)
    qlora.release_scratch()
    run_path("hybrid", case, q_inputs)
    assert [key[:2] for key in qlora._SCRATCH] == [(torch.device(kernel_device), torch.bfloat16)]
    qlora.release_scratch()


def test_launchers_refuse_4bit_weight_on_the_hybrid_form(kernel_device):
    from lora_kernels.kernels.linear_bwd import lora_linear_bwd
    from lora_kernels.kernels.linear_fwd import lora_linear_fwd

    qw = quantize(torch.randn(40, 64), "nf4", 64).to(kernel_device)
    x = torch.randn(8, 64, device=kernel_device)
    u, b = torch.randn(8, 4, device=kernel_device), torch.randn(40, 4, device=kernel_device)
    with pytest.raises(ValueError, match="fused GEMM only"):
        lora_linear_fwd(x, qw, None, u, b, 1.0, y=torch.zeros(8, 40, device=kernel_device))
    g, a = torch.randn(8, 40, device=kernel_device), torch.randn(4, 64, device=kernel_device)
    with pytest.raises(ValueError, match="fused dx GEMM only"):
        lora_linear_bwd(g, qw, u, a, x, 1.0, 0, 0.0, dx=torch.zeros(8, 64, device=kernel_device))


def test_bad_inputs_on_the_fused_path(kernel_device):
    import lora_kernels as lk

    qw = quantize(torch.randn(40, 64), "nf4", 64).to(kernel_device)
    a, b = torch.randn(4, 64, device=kernel_device), torch.randn(40, 4, device=kernel_device)
    with pytest.raises(ValueError, match="in_features|K|last dim"):
        lk.lora_linear(torch.randn(8, 63, device=kernel_device), qw, a[:, :63], b, 1.0, backend="fused")
    with pytest.raises(ValueError, match="lora_b|shape"):
        lk.lora_linear(torch.randn(8, 64, device=kernel_device), qw, a, b[:39], 1.0, backend="fused")
    with pytest.raises(TypeError, match="decodes to"):
        from lora_kernels.kernels.dequant import quant_operands

        quant_operands(qw, torch.float64)


def test_quantized_weight_pickles():
    qw = quantize(torch.randn(8, 64), "fp4", 64, compress_statistics=True)
    back = pickle.loads(pickle.dumps(qw))
    assert torch.equal(dequantize(back, torch.float32), dequantize(qw, torch.float32))


def test_qlora_path_rule():
    """The modeled rule (lora_kernels.qlora.QLORA_FUSED_MAX_TOKENS): on CUDA fused up to the threshold,
    hybrid above; off CUDA (the interpreter) fused."""
    limit = qlora.QLORA_FUSED_MAX_TOKENS
    cuda = torch.device("cuda")
    assert qlora.choose_qlora_path(1, cuda) == "fused"
    assert qlora.choose_qlora_path(limit, cuda) == "fused"
    assert qlora.choose_qlora_path(limit + 1, cuda) == "hybrid"
    assert qlora.choose_qlora_path(8192, cuda) == "hybrid"
    assert qlora.choose_qlora_path(8192, torch.device("cpu")) == "fused"


def test_explicit_backend_is_kept(monkeypatch, kernel_device):
    """backend='hybrid' / 'fused' are obeyed as asked; 'triton' takes the rule."""
    case = LoraCase(m=8, n=40, k=72, r=4, dtype=torch.float32)
    (x, qw, a, b, bias, _, _), _ = _inputs(case, "nf4", 64, False, kernel_device)
    seen = []
    real = qlora._QLoraLinear.apply
    monkeypatch.setattr(qlora._QLoraLinear, "apply", lambda *args: seen.append(args[8]) or real(*args))
    for backend in ("hybrid", "fused", "triton"):
        qlora.lora_linear(x, qw, a, b, 2.0, backend=backend)
    assert seen == ["hybrid", "fused", qlora.choose_qlora_path(8, x.device)]


def test_torch_compile_graph_breaks_around_4bit_and_refuses_fullgraph(kernel_device):
    """The 4-bit entry points are compiler-disabled (lora_kernels.qlora.COMPILE_REASON): torch.compile
    runs them eagerly behind a graph break with the same results, fullgraph=True fails naming why."""
    import torch._dynamo

    import lora_kernels as lk
    from lora_kernels.qlora_layers import QLoRALinear, QuantLinear

    case = LoraCase(m=8, n=40, k=72, r=4, dtype=torch.float32, dropout_p=0.1)
    (x, qw, a, b, bias, _, _), _ = _inputs(case, "nf4", 64, True, kernel_device)
    a.requires_grad_(True)

    def f(x):
        return lk.lora_linear(x, qw, a, b, 2.0, bias=bias, dropout_p=0.1, seed=11, backend="fused") * 2

    torch._dynamo.reset()
    try:
        eager = f(x)
        compiled = torch.compile(f, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)
        assert torch.equal(torch.autograd.grad(compiled.sum(), a)[0], torch.autograd.grad(eager.sum(), a)[0])
        torch._dynamo.reset()
        with pytest.raises(Exception, match="4-bit QuantizedWeight runs eagerly under torch.compile"):
            torch.compile(f, backend="aot_eager", fullgraph=True)(x)
        torch._dynamo.reset()
        layer = QLoRALinear(QuantLinear(qw, bias), 4, 8.0, dropout=0.0)
        assert torch.equal(torch.compile(layer, backend="aot_eager")(x), layer(x))
    finally:
        torch._dynamo.reset()


def test_64bit_index_path(monkeypatch, kernel_device):
    """IDX64 (chosen when N·K >= 2**31, too big for a test) forced on a small weight: same results."""
    from lora_kernels.kernels import dequant

    case = LoraCase(m=9, n=33, k=75, r=3, dtype=torch.bfloat16, dropout_p=0.1, dora=True)
    q_inputs, dense_inputs = _inputs(case, "nf4", 64, True, kernel_device)
    before = run_path("fused", case, q_inputs)
    real = dequant.quant_operands

    def forced(qw, dtype):
        ptrs, flags = real(qw, dtype)
        return ptrs, dict(flags, IDX64=True)

    monkeypatch.setattr(dequant, "quant_operands", forced)
    after = run_path("fused", case, q_inputs)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    out = torch.empty(q_inputs[1].shape, dtype=torch.bfloat16, device=kernel_device)
    assert torch.equal(dequant.dequant_4bit(q_inputs[1], out), dense_inputs[1])


_FRESH_PRELUDE = (
    "import sys, torch\n"
    "{before}\n"
    "import lora_kernels as lk\n"
    "from lora_kernels import qlora\n"
    "from lora_kernels.quant import quantize\n"
    "torch.manual_seed(0)\n"
    "qw = quantize(torch.randn(40, 64), 'nf4', 64)\n"
    "a = torch.randn(4, 64, requires_grad=True); b = torch.randn(40, 4, requires_grad=True)\n"
    "x = torch.randn(3, 64)\n"
    "f = lambda x: lk.lora_linear(x, qw, a, b, 2.0, backend='torch').relu()\n"
    "{setup}\n"
    "try:\n"
    "    torch.compile(f, fullgraph=True, backend='eager')(x)\n"
    "    print('NO ERROR')\n"
    "except Exception as e:\n"
    "    print('NAMED' if qlora.COMPILE_REASON in str(e) else 'UNNAMED')\n"
    "torch._dynamo.reset()\n"
    "assert torch.equal(torch.compile(f, backend='eager')(x), f(x))\n"
)


@pytest.mark.parametrize("before,setup,expect", [
    ("", "", "UNNAMED"),  # documented: a bare functional call compiled first, nothing built yet
    ("import torch._dynamo", "", "NAMED"),
    ("", "lk.qlora_layers.QuantLinear(qw)", "NAMED"),
    ("", "lk.qlora_layers.QLoRALinear(lk.qlora_layers.QuantLinear(qw), 4, 8.0)", "NAMED"),
    ("", "lk.lora_linear(x, qw, a, b, 2.0, backend='torch')", "NAMED"),
    ("", "lk.qlora.linear(x, qw)", "NAMED"),  # an eager call of another entry point builds them all
])
def test_fullgraph_error_names_the_reason_in_a_fresh_process(before, setup, expect):
    """Exactly the orders docs/qlora.md states: fullgraph=True names COMPILE_REASON once torch._dynamo
    was imported before lora_kernels, a 4-bit layer was constructed, or any 4-bit entry point ran
    eagerly; a bare functional call compiled first fails with Dynamo's own message. Fullgraph=False is
    right in every case. Fresh processes (the disabled functions are built once per process)."""
    import os
    import subprocess
    import sys

    code = _FRESH_PRELUDE.format(before=before, setup=setup)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == expect, r.stdout

"""DoRA: the torch backend and the Triton paths against dora_linear_ref, PEFT's own DoRA layer,
the norm without W + s·B·A, zero rows, saved bytes, and the layer (init, merge/unmerge)."""
import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, dora_linear
from lora_kernels.dora import dora_weight_norm_torch
from lora_kernels.dropout import apply_dropout
from lora_kernels.reference import dora_linear_ref, dora_weight_norm_ref
from lora_kernels.testing import TOLERANCES, LoraCase, compare, rel_error

from .conftest import KERNEL_DEVICE

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _problem(m, n, k, r, dtype, bias=True, seed=0, device="cpu", lead=()):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g, dtype=f64) * std).to(dtype).to(device)

    x = rnd(*lead, m, k)
    w = rnd(n, k, std=k ** -0.5)
    a = rnd(r, k, std=k ** -0.5)
    b = rnd(n, r, std=r ** -0.5)
    mag = (dora_weight_norm_ref(w.double(), a.double(), b.double(), 2.0) * (1 + 0.3 * torch.rand(n, generator=g,
           dtype=f64)).to(device)).to(dtype)
    bias_t = rnd(n) if bias else None
    grad = rnd(*lead, m, n)
    return x, w, a, b, mag, bias_t, grad


def _grads(fn, x, a, b, mag, bias, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, mag)]
    bias_leaf = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(leaves[0], leaves[1], leaves[2], leaves[3], bias_leaf)
    wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
    names = ["dx", "dA", "dB", "dm"] + (["db"] if bias_leaf is not None else [])
    return {"y": y.detach(), **dict(zip(names, torch.autograd.grad(y, wrt, grad)))}


def _compare(path, m, n, k, r, dtype, p, bias=True, lead=(), device="cpu"):
    case = LoraCase(m, n, k, r, dtype, p, bias=bias, batch=lead[0] if lead else None, dora=True)
    errors = compare(path, case, device=device)
    tol = TOLERANCES[dtype]
    bad = {q: e for q, e in errors.items() if not e <= tol}
    assert not bad, f"{path} {case}: {bad} above {tol}"


@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("m,n,k,r,p,bias,lead", [
    (33, 17, 29, 1, 0.0, True, ()),
    (33, 17, 29, 8, 0.1, False, ()),
    (7, 31, 23, 12, 0.5, True, (3,)),
])
def test_torch_backend_matches_reference(m, n, k, r, p, bias, lead, dtype):
    _compare("torch", m, n, k, r, dtype, p, bias, lead)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_streamed_norm_matches_materialised_norm(dtype):
    x, w, a, b, *_ = _problem(5, 300, 200, 16, dtype)
    n = dora_weight_norm_torch(w, a, b, 2.0, chunk_rows=64)
    assert n.dtype == f32
    ref = dora_weight_norm_ref(w.double(), a.double(), b.double(), 2.0)
    assert rel_error(n, ref) < 1e-6


def test_norm_has_no_cancellation_when_the_update_cancels_the_weight():
    """n_j ≪ ‖W_j‖ (W_j ≈ −s·B_j·A): the low-rank identity loses ~eps32·‖W‖²/n² here; streaming does not."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 64, generator=g, dtype=f64)
    b = torch.randn(32, 4, generator=g, dtype=f64)
    w = -2.0 * (b @ a) + 1e-3 * torch.randn(32, 64, generator=g, dtype=f64)
    n = dora_weight_norm_torch(w.float(), a.float(), b.float(), 2.0)
    ref = dora_weight_norm_ref(w.float().double(), a.float().double(), b.float().double(), 2.0)
    assert rel_error(n, ref) < 1e-3, rel_error(n, ref)


def test_zero_rows_stay_finite_and_nan_in_x_propagates():
    x, w, a, b, mag, bias, _ = _problem(6, 10, 12, 4, f32)
    w[3] = 0.0
    b[3] = 0.0
    mag = dora_weight_norm_ref(w, a, b, 2.0).clone()  # m = n at init: 0 on row 3 (up to eps)
    mag[3] = 0.0
    y = dora_linear(x, w, a, b, mag, 2.0, bias, backend="torch")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 3], bias[3].expand(6))
    x[2, 5] = float("nan")
    y = dora_linear(x, w, a, b, mag, 2.0, bias, backend="torch")
    assert torch.isnan(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_layer_init_equals_base_and_merge_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    layer = LoRALinear.from_linear(base, rank=8, alpha=16, dropout=0.1, use_dora=True)
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.1)
    layer.eval()
    before, w0 = layer(x), base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B", "adapters.default.lora_magnitude"}


def test_bad_dora_inputs():
    x, w, a, b, mag, bias, _ = _problem(4, 6, 8, 2, f32)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        dora_linear(x, w, a, b, mag[:5], 1.0)
    with pytest.raises(TypeError, match="magnitude must have a floating dtype"):
        dora_linear(x, w, a, b, mag.to(torch.int64), 1.0)


def _saved(fn, known):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        if t.data_ptr() in known or (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))
        total += t.numel() * t.element_size()
    return total


class _SeededDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout so PEFT sees exactly our mask."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return apply_dropout(x.reshape(-1, x.shape[-1]), self.seed, self.p).reshape(x.shape)


def _peft_dora(w, a, b, mag, bias, p, alpha):
    peft = pytest.importorskip("peft")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)

        def forward(self, x):
            return self.proj(x)

    model = One()
    with torch.no_grad():
        model.proj.weight.copy_(w)
        if bias is not None:
            model.proj.bias.copy_(bias)
    cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_dora=True)
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        layer.lora_magnitude_vector["default"].weight.copy_(mag)
    if p > 0:
        layer.lora_dropout["default"] = _SeededDropout(p, 11)
    return model, layer


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("training", [True, False])
def test_equals_peft_dora_layer(p, training):
    m, n, k, r = 40, 24, 32, 4
    x, w, a, b, mag, bias, grad = _problem(m, n, k, r, f32, lead=(2,))
    model, layer = _peft_dora(w, a, b, mag, bias, p, alpha=2.0 * r)
    model.train(training)
    xp = x.clone().requires_grad_(True)
    y_peft = layer(xp)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    g_peft = torch.autograd.grad(y_peft, [xp] + params, grad)
    out = _grads(lambda x_, a_, b_, m_, b2: dora_linear(x_, w, a_, b_, m_, 2.0, bias, p, seed=11, training=training,
                                                         backend="torch"), x, a, b, mag, None, grad)
    assert rel_error(out["y"], y_peft) < 1e-5
    for name, g in zip(["dx", "dA", "dB", "dm"], g_peft):
        assert rel_error(out[name], g) < 1e-5, name


def test_saves_fewer_bytes_than_peft_dora():
    m, n, k, r, p = 256, 96, 128, 8, 0.1
    x, w, a, b, mag, bias, _ = _problem(m, n, k, r, f32)
    model, layer = _peft_dora(w, a, b, mag, bias, p, alpha=2.0 * r)
    model.train()
    a_, b_, m_ = (t.clone().requires_grad_(True) for t in (a, b, mag))
    ours = _saved(lambda: dora_linear(x, w, a_, b_, m_, 2.0, bias, p, seed=3, backend="torch"),
                  {x.data_ptr(), w.data_ptr(), a_.data_ptr(), b_.data_ptr(), m_.data_ptr()})
    peft_known = {x.data_ptr()} | {q.data_ptr() for q in layer.parameters()}
    theirs = _saved(lambda: layer(x), peft_known)
    # ours: u (M×r) + h (M×N) + n (N), fp32
    assert ours == 4 * (m * r + m * n + n), ours
    assert ours < theirs, f"saved for backward beyond x and parameters: ours {ours} B, PEFT DoRA {theirs} B"


DORA_KERNEL_CASES = [
    (70, 90, 130, 1, f32, 0.0, True, ()),
    (70, 90, 130, 8, f16, 0.1, False, ()),
    (33, 65, 70, 12, bf16, 0.5, True, (3,)),
    (150, 65, 70, 64, f32, 0.1, True, ()),   # several M splits (dA, dB, dm)
    (45, 33, 129, 8, f32, 0.1, True, (2,)),
    (17, 130, 33, 16, bf16, 0.0, False, ()),
    (40, 40, 64, 200, f16, 0.1, True, ()),   # rank padded to 256 in the kernel
]


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["fused", "hybrid"])
@pytest.mark.parametrize("m,n,k,r,dtype,p,bias,lead", DORA_KERNEL_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else f"lead{len(v)}")
def test_triton_paths_match_reference(kernel_device, path, m, n, k, r, dtype, p, bias, lead):
    _compare(path, m, n, k, r, dtype, p, bias, lead, device=kernel_device)


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_triton_dora_matches_torch_backend_with_dropout(kernel_device, path):
    """Same seed, same mask: with p = 0.5 a different mask would change y by O(1)."""
    x, w, a, b, mag, bias, _ = _problem(50, 60, 70, 8, f32, device=kernel_device)
    y_triton = dora_linear(x, w, a, b, mag, 2.0, bias, 0.5, seed=3, backend=path)
    y_torch = dora_linear(x, w, a, b, mag, 2.0, bias, 0.5, seed=3, backend="torch")
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", "fused", "hybrid"])
def test_dora_opcheck(kernel_device, impl):
    x, w, a, b, mag, bias, g = _problem(20, 33, 40, 4, f32, device=kernel_device)
    fwd_args = (x, w, bias, a, b, mag, 0.5, 0.1, 7, impl)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_fwd, fwd_args)
    _, u, h, norm = torch.ops.lora_kernels.dora_linear_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_bwd,
                          (g, x, w, a, b, mag, u, h, norm, 0.5, 0.1, 7, impl, True))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,r", [(f32, 12), (bf16, 200)])
def test_triton_norm_kernel_matches_materialised_norm(kernel_device, dtype, r):
    from lora_kernels.kernels.dora import dora_weight_norm

    x, w, a, b, *_ = _problem(5, 130, 70, r, dtype, device=kernel_device)
    n = dora_weight_norm(w, a, b, 2.0)
    ref = dora_weight_norm_ref(w.double().cpu(), a.double().cpu(), b.double().cpu(), 2.0)
    assert rel_error(n.cpu(), ref) < 1e-6  # fp32 accumulation of exactly representable inputs


@pytest.mark.parametrize("path", ["torch", "fused", "hybrid"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_dora_at_init_is_the_base_output_exactly(path, p, dtype):
    """m == n (so c == 1) and B == 0: PEFT's form y = base + ((c − 1)·P + c·s·u·Bᵀ) adds exactly 0,
    so y is the base output bit for bit (torch: F.linear; hybrid: cuBLAS/torch addmm; fused: the
    fused GEMM's own x·Wᵀ + b, i.e. the LoRA output of the same path with B == 0)."""
    device = "cpu" if path == "torch" else KERNEL_DEVICE
    x, w, a, _, _, bias, _ = _problem(33, 40, 48, 8, dtype, device=device)
    b = torch.zeros(40, 8, dtype=dtype, device=device)
    mag = dora_weight_norm_torch(w, a, b, 2.0) if path == "torch" else \
        __import__("lora_kernels.kernels.dora", fromlist=["dora_weight_norm"]).dora_weight_norm(w, a, b, 2.0)
    y = dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=p, seed=7, backend=path)
    if path == "fused":
        from lora_kernels import lora_linear
        base = lora_linear(x, w, a, b, 2.0, bias, dropout_p=p, seed=7, backend="fused")
    else:
        base = torch.nn.functional.linear(x, w, bias)
    assert torch.equal(y, base), (y - base).abs().max()

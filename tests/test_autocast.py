"""Mixed precision: torch.autocast (bf16) around LoRA / DoRA. Under autocast for x's device type the
functional casts x, the frozen weight, the bias and the adapters to the autocast dtype (as autocast
does for F.linear) and runs the op with autocast off inside; adapters may stay float32 (PEFT's
default) and get float32 gradients. Outside autocast nothing is cast silently: a weight whose dtype
differs from x's is still an error."""
import pytest
import torch

from lora_kernels import dora_linear, lora_linear
from lora_kernels.testing import LoraCase, make_inputs, rel_error
from tests.test_tiny_llama import TinyConfig, grads, lm_loss, make_model, make_tokens

BF16 = torch.bfloat16


def _call(dora, x, w, a, b, bias, mag, **kw):
    if dora:
        return dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=0.2, seed=5, **kw)
    return lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.2, seed=5, **kw)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("weight_dtype", [torch.float32, BF16], ids=["fp32-weight", "bf16-weight"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_autocast_equals_explicit_casts(dora, weight_dtype):
    """fp32 activations and adapters, fp32 or bf16 frozen weight: under autocast the result is exactly
    the op on bf16-cast inputs outside autocast (so nothing inside the op, e.g. DoRA's fp32 norm, was
    autocast again); y is bf16; gradients reach x, A, B, m in their own (fp32) dtype."""
    x0, w0, a0, b0, bias0, g, mag0 = make_inputs(LoraCase(24, 20, 28, 4, dora=True))
    w = w0.to(weight_dtype)
    x, a, b, mag = _leaves(x0, a0, b0, mag0)
    with torch.autocast("cpu", dtype=BF16):
        y = _call(dora, x, w, a, b, bias0, mag)
    assert y.dtype == BF16
    y.backward(g.to(BF16))

    xr, ar, br, magr = _leaves(x0, a0, b0, mag0)
    ref = _call(dora, xr.to(BF16), w.to(BF16), ar.to(BF16), br.to(BF16), bias0.to(BF16), magr)
    ref.backward(g.to(BF16))
    assert torch.equal(y, ref)
    for got, want in [(x, xr), (a, ar), (b, br)] + ([(mag, magr)] if dora else []):
        assert got.grad.dtype == torch.float32
        assert torch.equal(got.grad, want.grad)


def test_backward_inside_autocast_gives_the_same_gradients():
    x0, w, a0, b0, bias, g, mag0 = make_inputs(LoraCase(24, 20, 28, 4, dora=True))
    out = []
    for backward_inside in (False, True):
        x, a, b, mag = _leaves(x0, a0, b0, mag0)
        with torch.autocast("cpu", dtype=BF16):
            y = _call(True, x, w, a, b, bias, mag)
            if backward_inside:
                y.backward(g.to(BF16))
        if not backward_inside:
            y.backward(g.to(BF16))
        out.append([x.grad, a.grad, b.grad, mag.grad])
    for u, v in zip(*out):
        assert torch.equal(u, v)


def test_no_silent_cast_outside_autocast():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(5, 6, 7, 2))
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear(x, w.to(BF16), a, b, 1.0, bias)
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear(x.to(BF16), w, a, b, 1.0, bias)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        with pytest.raises(TypeError, match="weight dtype"):
            lora_linear(x, w.to(BF16), a, b, 1.0, bias)
    y = lora_linear(x.double(), w.double(), a, b, 1.0, bias)  # float64 is never autocast
    with torch.autocast("cpu", dtype=BF16):
        assert lora_linear(x.double(), w.double(), a, b, 1.0, bias).dtype == torch.float64
    assert y.dtype == torch.float64


def test_model_trains_under_autocast_close_to_fp32():
    """The tiny LoRA + DoRA model, fp32 weights and adapters, under bf16 autocast: loss and adapter
    gradients (fp32) within bf16 tolerance of the fp32 run with the same masks; compiles with no graph
    break under autocast."""
    cfg = TinyConfig(use_dora=(False, True), dropout=0.1)
    tokens = make_tokens(cfg)
    model = make_model(cfg)
    torch.manual_seed(3)
    loss32 = lm_loss(model, tokens)
    loss32.backward()
    g32 = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=BF16):
        loss16 = lm_loss(model, tokens)
    loss16.backward()
    g16 = grads(model)
    assert abs(loss16.item() - loss32.item()) < 2e-2 * abs(loss32.item())
    for name in g32:
        assert g16[name].dtype == torch.float32
        assert rel_error(g16[name], g32[name]) < 6e-2, name
    with torch.autocast("cpu", dtype=BF16):
        explanation = torch._dynamo.explain(lambda t: lm_loss(model, t))(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons

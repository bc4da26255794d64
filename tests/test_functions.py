"""The custom ops and their autograd with the torch backend, against the float64 reference; and
what they save for backward."""
import pytest
import torch

from lora_kernels import lora_linear, lora_linear_ref
from lora_kernels.testing import TOLERANCES, LoraCase, compare, make_inputs

CASES = [
    LoraCase(33, 17, 29, 1),
    LoraCase(33, 17, 29, 8, dropout_p=0.1),
    LoraCase(40, 25, 19, 12, dropout_p=0.5, bias=False),
    LoraCase(7, 31, 23, 8, batch=3, dropout_p=0.1),
    LoraCase(26, 15, 37, 12, noncontiguous=True, dropout_p=0.5),
    LoraCase(26, 15, 37, 8, batch=2, noncontiguous=True, dropout_p=0.1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_reference(case, dtype):
    case.dtype = dtype
    errors = compare("torch", case)
    tol = TOLERANCES[dtype]
    bad = {q: e for q, e in errors.items() if not e <= tol}
    assert not bad, f"{case}: errors {bad} above {tol}"


def test_same_seed_same_output_and_other_seed_differs():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(20, 10, 30, 4))
    y1 = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, seed=5, backend="torch")
    y2 = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, seed=5, backend="torch")
    y3 = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, seed=6, backend="torch")
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_seed_none_is_reproducible_under_manual_seed():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(20, 10, 30, 4))
    torch.manual_seed(123)
    y1 = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, backend="torch")
    y1b = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, backend="torch")
    torch.manual_seed(123)
    y2 = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, backend="torch")
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y1b), "consecutive calls must draw fresh masks"


def test_eval_mode_disables_dropout():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(20, 10, 30, 4))
    y = lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.5, seed=1, training=False, backend="torch")
    torch.testing.assert_close(y, lora_linear_ref(x, w, a, b, 1.0, bias), rtol=0, atol=0)


def test_frozen_weight_gets_no_grad_and_trainable_weight_gets_the_right_one():
    x, w, a, b, bias, g, _ = make_inputs(LoraCase(20, 10, 30, 4, dtype=torch.float64))
    a.requires_grad_(True)
    lora_linear(x, w, a, b, 1.0, bias, backend="torch").backward(g)
    assert w.grad is None and a.grad is not None
    w2 = w.clone().requires_grad_(True)
    lora_linear(x, w2, a, b, 1.0, bias, dropout_p=0.3, seed=2, backend="torch").backward(g)
    torch.testing.assert_close(w2.grad, g.t() @ x)


def test_fp32_adapters_with_lower_precision_activations():
    """PEFT keeps adapters in fp32 next to bf16 activations: gradients arrive in fp32."""
    x, w, a, b, bias, g, _ = make_inputs(LoraCase(16, 12, 24, 4, dtype=torch.bfloat16))
    a32 = a.float().requires_grad_(True)
    b32 = b.float().requires_grad_(True)
    y = lora_linear(x, w, a32, b32, 1.0, bias, backend="torch")
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32


def test_empty_batch_returns_empty():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(3, 10, 30, 4))
    x0 = x[:0].requires_grad_(True)
    a.requires_grad_(True)
    y = lora_linear(x0, w, a, b, 1.0, bias, dropout_p=0.1, seed=1, backend="torch")
    assert y.shape == (0, 10)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def _saved_bytes(fn):
    """(total bytes saved for backward, list of saved shapes, list of data pointers)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_no_activation_sized_tensor_besides_x(p):
    m, n, k, r = 256, 96, 128, 8
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(m, n, k, r))
    a.requires_grad_(True)
    b.requires_grad_(True)
    _, ours = _saved_bytes(lambda: lora_linear(x, w, a, b, 2.0, bias, dropout_p=p, seed=3, backend="torch"))
    _, naive = _saved_bytes(lambda: lora_linear_ref(x, w, a, b, 2.0, bias, dropout_p=p, seed=3))
    known = {x.data_ptr(), w.data_ptr(), a.data_ptr(), b.data_ptr()}

    def activation_bytes(ts):  # saved bytes beyond x and the parameters, which are alive anyway
        return sum(t.numel() * t.element_size() for t in ts if t.data_ptr() not in known)

    x_like = [tuple(t.shape) for t in ours if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert x_like == [], f"torch backend saved an activation-sized tensor besides x: {x_like}"
    assert activation_bytes(ours) == 4 * m * r, "only u (M×r, fp32) should be saved besides x and parameters"
    naive_x_like = [t for t in naive if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    if p > 0:
        assert len(naive_x_like) >= 1, "the naive path keeps the masked copy of x for dA"
        assert activation_bytes(naive) >= 4 * m * k + activation_bytes(ours), (
            f"naive saves {activation_bytes(naive)} B, ours {activation_bytes(ours)} B")


def test_zero_in_features_is_valid():
    x, w = torch.randn(3, 0), torch.randn(6, 0)
    a, b, bias = torch.randn(2, 0), torch.randn(6, 2), torch.randn(6)
    y = lora_linear(x, w, a, b, 1.0, bias, backend="torch")
    torch.testing.assert_close(y, bias.expand(3, 6))

"""The reference against naive float64 math, and gradcheck."""
import torch

from lora_kernels import lora_linear_ref
from lora_kernels.dropout import dropout_mask


def _inputs(m=9, n=7, k=11, r=3, lead=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    return x, w, a, b, bias


def test_reference_matches_elementwise_sums():
    x, w, a, b, bias = _inputs()
    s, p, seed = 0.7, 0.3, 99
    z = dropout_mask(seed, 9, 11, p, dtype=torch.float64)
    y = lora_linear_ref(x, w, a, b, s, bias=bias, dropout_p=p, seed=seed)
    expected = torch.empty(9, 7, dtype=torch.float64)
    for i in range(9):
        for j in range(7):
            base = sum(x[i, t] * w[j, t] for t in range(11)) + bias[j]
            lora = sum(b[j, q] * sum(x[i, t] * z[i, t] * a[q, t] for t in range(11)) for q in range(3))
            expected[i, j] = base + s * lora
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_reference_leading_dims_flatten_row_major():
    x, w, a, b, bias = _inputs(m=5, lead=(3,))
    y3 = lora_linear_ref(x, w, a, b, 1.5, bias=bias, dropout_p=0.2, seed=1)
    y2 = lora_linear_ref(x.reshape(15, 11), w, a, b, 1.5, bias=bias, dropout_p=0.2, seed=1)
    assert y3.shape == (3, 5, 7)
    torch.testing.assert_close(y3.reshape(15, 7), y2, rtol=0, atol=0)


def test_reference_gradcheck():
    x, w, a, b, bias = _inputs(m=4, n=3, k=5, r=2)
    for t in (x, a, b, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: lora_linear_ref(x, w, a, b, 0.5, bias=bias, dropout_p=0.4, seed=3),
        (x, a, b, bias),
    )

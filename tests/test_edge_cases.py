"""Numerical edge cases: NaN/inf propagate like the reference, fp16 accumulation does not overflow
where the reference does not, DoRA zero rows stay finite on every path, merge/unmerge cycles do not
drift beyond rounding, ranks above min(in, out) warn."""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import dora_linear, dora_linear_ref, lora_linear, lora_linear_ref
from lora_kernels.reference import dora_weight_norm_ref

from .conftest import KERNEL_DEVICE

PATHS = ["torch", "fused", "hybrid"]


def _device(path):
    return "cpu" if path == "torch" else KERNEL_DEVICE


def _inputs(m, n, k, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype).to(device)  # noqa
    return rnd(m, k), rnd(n, k, std=k ** -0.5), rnd(r, k, std=k ** -0.5), rnd(n, r), rnd(n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_nan_and_inf_propagate_to_the_reference_positions(path, dora, p):
    device = _device(path)
    x, w, a, b, bias = _inputs(40, 50, 70, 4, torch.float32, device)
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[11, 2] = -float("inf")
    args64 = [t.double().cpu() for t in (x, w, a, b)]
    if dora:
        mag = dora_weight_norm_ref(w, a, b, 2.0) * 1.1
        y = dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=p, seed=5, backend=path)
        ref = dora_linear_ref(*args64, mag.double().cpu(), 2.0, bias.double().cpu(), dropout_p=p, seed=5)
    else:
        y = lora_linear(x, w, a, b, 2.0, bias, dropout_p=p, seed=5, backend=path)
        ref = lora_linear_ref(*args64, 2.0, bias.double().cpu(), dropout_p=p, seed=5)
    y = y.cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ from the reference"
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)) and torch.equal(torch.isneginf(y), torch.isneginf(ref))
    assert torch.isnan(y[3]).all() and torch.isfinite(y[[0, 1, 2, 4, 5]]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_fp16_accumulation_does_not_overflow_where_the_reference_does_not(path):
    """Terms of ±4e4 (their running sum would exceed fp16's 65504) that cancel to a small output."""
    device = _device(path)
    k = 128
    x = torch.full((16, k), 200.0)
    x[:, 1::2] = -200.0
    w = torch.full((24, k), 200.0)
    x, w = x.half().to(device), w.half().to(device)
    a = torch.full((4, k), 1e-3).half().to(device)
    b = torch.randn(24, 4).half().to(device)
    y = lora_linear(x, w, a, b, 1.0, backend=path)
    ref = lora_linear_ref(x.double().cpu(), w.double().cpu(), a.double().cpu(), b.double().cpu(), 1.0)
    assert torch.isfinite(y).all(), "the accumulator overflowed"
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_all_zero_rows_stay_finite(path, p):
    device = _device(path)
    x, w, a, b, bias = _inputs(20, 30, 40, 4, torch.float32, device)
    w[[0, 7]] = 0.0
    b[[0, 7]] = 0.0
    mag = dora_weight_norm_ref(w, a, b, 2.0)  # m = n at init: 0 on the zero rows
    mag[[0, 7]] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, mag)]
    y = dora_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], 2.0, bias, dropout_p=p, seed=1, backend=path)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 0], bias[0].expand(20))
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("dtype,cycles", [(torch.float32, 20), (torch.bfloat16, 20)])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_cycles_stay_within_rounding(dtype, cycles, use_dora):
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    layer = lk.LoRALinear.from_linear(base, rank=8, alpha=16, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    w0 = base.weight.detach().float().clone()
    bound = 0.0
    for _ in range(cycles):
        merged = (base.weight.float() + layer.delta_weight()).abs().max().item()
        layer.merge()
        layer.unmerge()
        # each cycle may add at most one rounding of the merged weight and one of the restored weight
        bound += torch.finfo(dtype).eps * (merged + w0.abs().max().item()) * (4 if use_dora else 1)
    drift = (base.weight.float() - w0).abs().max().item()
    assert drift <= bound, f"drift {drift:.3e} after {cycles} cycles exceeds the rounding bound {bound:.3e}"


def test_rank_above_min_dimension_warns_and_still_works():
    with pytest.warns(UserWarning, match="exceeds min"):
        layer = lk.LoRALinear.from_linear(nn.Linear(6, 4), rank=8, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, 1.0, layer.bias))

"""LoRALinear: init, trainable parameters, merge/unmerge, backends."""
import math

import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, lora_linear_ref, lora_scale


def _layer(dtype=torch.float32, bias=True, **kw):
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias).to(dtype)
    return base, LoRALinear.from_linear(base, rank=kw.pop("rank", 8), alpha=kw.pop("alpha", 16), **kw)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_output_equals_base_at_init(init):
    base, layer = _layer(init=init, dropout=0.1)
    x = torch.randn(3, 5, 48)
    expected = torch.nn.functional.linear(x, base.weight, base.bias)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.abs().sum() > 0 and torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_parameter_shapes_dtype_and_scale():
    _, layer = _layer(dtype=torch.bfloat16, rank=4, alpha=8)
    assert layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (40, 4)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.scale == 2.0
    _, rs = _layer(rank=4, alpha=8, use_rslora=True)
    assert rs.scale == pytest.approx(8 / math.sqrt(4)) == lora_scale(4, 8, True)


def test_gaussian_init_std():
    _, layer = _layer(rank=16, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 16) < 0.01


def test_only_lora_parameters_get_gradients():
    base, layer = _layer(dropout=0.1)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}
    layer(torch.randn(6, 48)).pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert base.weight.grad is None and base.bias.grad is None


def test_forward_matches_reference_after_training_step():
    _, layer = _layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(10, 48)
    expected = lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale, layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_dropout_only_in_training_mode():
    _, layer = _layer(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(10, 48)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    expected = lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "each training call draws a fresh mask"


def test_merge_forward_equals_unmerged_and_unmerge_restores_weight():
    base, layer = _layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = base.weight.detach().clone()
    x = torch.randn(7, 48)
    layer.eval()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(base.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=4 * torch.finfo(torch.float32).eps * w0.abs().max().item() + 1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_double_merge_and_double_unmerge_raise():
    _, layer = _layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_bad_layer_arguments():
    base = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_linear(base, rank=0, alpha=1)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_linear(base, rank=-2, alpha=1)
    with pytest.raises(TypeError, match="rank"):
        LoRALinear.from_linear(base, rank=2.5, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear.from_linear(base, rank=2, alpha=1, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        LoRALinear.from_linear(base, rank=2, alpha=1, init="pissa_typo")
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1), rank=2, alpha=1)
    with pytest.raises(ValueError, match="backend"):
        LoRALinear.from_linear(base, rank=2, alpha=1, backend="cuda")

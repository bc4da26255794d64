"""QLoRA modules without bitsandbytes: QuantLinear, QLoRALinear, lk.inject(..., quantize=...), adapters
save/load, merge (re-quantised, warned) / unmerge (exact) / merge_and_dequantize (exact), bad input."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.layers import LoRALinear
from lora_kernels.qlora_layers import QLoRALinear, QuantLinear, merge_and_dequantize, quantize_linears
from lora_kernels.quant import dequantize

from .models import logits, randomize_adapters, tiny_llama, tokens


def test_quant_linear_forward_backward_and_dtype_moves():
    lin = nn.Linear(70, 24)
    q = QuantLinear.from_linear(lin, "nf4", 64, compress_statistics=True)
    w = dequantize(q.weight, torch.float32)
    x = torch.randn(3, 5, 70, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.shape == (24, 70) for t in saved)
    ref = nn.functional.linear(x2, w, lin.bias.detach())
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    q16 = copy.deepcopy(q).to(torch.bfloat16)
    assert q16.weight_absmax.dtype == torch.uint8 and q16.weight_nested_absmax.dtype == torch.float32
    assert q16.bias.dtype == torch.bfloat16 and q16(x.detach().bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x.detach()).dtype == torch.bfloat16
    fresh = QuantLinear.from_linear(nn.Linear(70, 24), "nf4", 64, compress_statistics=True)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x.detach()), y.detach())


def _quantized_llama():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    quantize_linears(model, "nf4")
    return model, dense


def test_inject_quantize_equals_dense_model_on_dequantised_weights():
    model = tiny_llama()
    names = lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                      quantize="nf4")
    assert isinstance(model.model.embed_tokens, lk.LoRAEmbedding)  # embeddings stay dense
    names = [n for n in names if "embed" not in n]
    assert names and all(isinstance(model.get_submodule(n), QLoRALinear) for n in names)
    assert all(isinstance(model.get_submodule(n).base_layer, QuantLinear) for n in names)
    randomize_adapters(model)
    # the same network with dense weights equal to the dequantised ones, adapted by LoRALinear
    dense = copy.deepcopy(model)
    for n in names:
        layer = dense.get_submodule(n)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(dequantize(layer.weight, torch.float32))
        new = LoRALinear(lin, rank=4, alpha=8)
        new.adapters["default"].load_state_dict(layer.adapters["default"].state_dict())
        parent, _, attr = n.rpartition(".")
        setattr(dense.get_submodule(parent), attr, new)
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_inject_on_prequantized_model_dora_and_adapter_round_trip(tmp_path):
    model, _ = _quantized_llama()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QLoRALinear) and layer.use_dora
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)  # m = n at init
    randomize_adapters(model)
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path)
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path)
    assert isinstance(again.model.layers[0].self_attn.q_proj, QLoRALinear)
    torch.testing.assert_close(logits(again, ids), ours, rtol=0, atol=0)


def test_merge_requantises_with_warning_and_unmerge_is_exact():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]), quantize="fp4")
    randomize_adapters(model)
    ids = tokens()
    before = logits(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight_packed.clone()
    with pytest.warns(UserWarning, match="re-quantised"):
        lk.merge(model)
    assert layer.merged and not torch.equal(layer.base_layer.weight_packed, packed)
    assert 0 < layer.merge_rounding < 1
    merged = logits(model, ids)
    assert (merged - before).abs().max() < 0.5 and not torch.equal(merged, before)  # rounded, not exact
    lk.unmerge(model)
    assert torch.equal(layer.base_layer.weight_packed, packed)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    exact = merge_and_dequantize(copy.deepcopy(model))
    assert isinstance(exact.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(exact, ids), before, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = lk.merge_and_unload(model)
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, QuantLinear)


def test_bad_configurations_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="quant_type"):
        lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj"]), quantize="int4")
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="already carries adapters on a dense weight"):
        lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]), adapter_name="b", quantize="nf4")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was changed
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="PiSSA"):
        lk.inject(fresh, lk.LoraConfig(rank=4, target_modules=["q_proj"], init="pissa"), quantize="nf4")
    assert not any(isinstance(m, QuantLinear) for m in fresh.modules())  # refused before quantising
    quantize_linears(fresh, "nf4")
    with pytest.raises(ValueError, match="PiSSA"):
        lk.inject(fresh, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], init="pissa"))
    assert not lk.model.lora_layers(fresh)
    q = QuantLinear.from_linear(nn.Linear(32, 24))
    with pytest.raises(ValueError, match="enable_lora"):
        QLoRALinear(q, 2, 4, enable_lora=[True, False])
    with pytest.raises(TypeError, match="QuantLinear or a bitsandbytes"):
        QLoRALinear(nn.Linear(4, 4), 2, 4)
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 31))

"""Shared-input projection groups (lora_kernels/groups.py, torch-backend prototype): outputs and
gradients equal the ungrouped layers' under the same seeds; one grouped op per group; state dict and
module names unchanged; refusals."""
import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import groups
from tests.models import tiny_llama, tokens

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(dropout, seed=0):
    model = tiny_llama(seed).train()
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # B away from zero so every gradient is non-trivial
        g = torch.Generator().manual_seed(7)
        for layer in lk.model.lora_layers(model).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    grouped = copy.deepcopy(model)
    made = groups.group_projections(grouped)
    return model, grouped, made


def _step(model, ids, seed):
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_equals_separate_layers(dropout):
    model, grouped, made = _pair(dropout)
    assert made == [[f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")] if j == 0 else
                    [f"model.layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj")]
                    for i in range(2) for j in range(2)]
    assert list(model.state_dict()) == list(grouped.state_dict())
    ids = tokens(batch=2, seq=12)
    before = groups.GROUP_CALLS["count"]
    y_sep, g_sep = _step(model, ids, seed=11)
    y_grp, g_grp = _step(grouped, ids, seed=11)
    assert groups.GROUP_CALLS["count"] - before == 4  # 2 layers x (q/k/v, gate/up): one op per group
    torch.testing.assert_close(y_grp, y_sep, rtol=1e-5, atol=1e-5)
    assert g_sep.keys() == g_grp.keys()
    for n in g_sep:
        torch.testing.assert_close(g_grp[n], g_sep[n], rtol=1e-4, atol=1e-6, msg=n)
    if dropout:  # a different seed gives different masks: the equality above is not trivial
        y_other, _ = _step(grouped, ids, seed=12)
        assert (y_other - y_sep).abs().max() > 1e-4


def test_partial_use_and_gradient_of_x():
    """Only some members' outputs used: the others get no gradient; dx still sums the used members."""
    torch.manual_seed(0)
    model, grouped, _ = _pair(0.2)
    sep = [getattr(model.model.layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    grp = [getattr(grouped.model.layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    x1 = torch.randn(3, 5, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    torch.manual_seed(3)
    ys = [m(x1) for m in sep]
    torch.manual_seed(3)
    yg = [m(x2) for m in grp]
    w = torch.randn_like(ys[0])
    ((ys[0] * w).sum() + ys[2].sum()).backward()
    ((yg[0] * w).sum() + yg[2].sum()).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(sep, grp):
        if a.lora_A.grad is None:
            assert b.lora_A.grad is None or b.lora_A.grad.abs().max() == 0
        else:
            torch.testing.assert_close(b.lora_A.grad, a.lora_A.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.lora_B.grad, a.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_merged_or_disabled_groups_compute_the_base_and_ungroup_restores():
    model, grouped, _ = _pair(0.0)
    model.eval()
    grouped.eval()
    ids = tokens(batch=1, seq=8)
    with torch.no_grad(), lk.adapters_disabled(grouped), lk.adapters_disabled(model):
        torch.testing.assert_close(grouped(input_ids=ids).logits, model(input_ids=ids).logits)
    lk.merge(grouped)
    with torch.no_grad():
        torch.testing.assert_close(grouped(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    lk.unmerge(grouped)
    assert groups.ungroup_projections(grouped) == 10
    assert not any(isinstance(m, groups.GroupedLoRALinear) for m in grouped.modules())


def test_refusals():
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM has all of"):
        groups.group_projections(tiny_llama(0))
    dora = tiny_llama(0)
    lk.inject(dora, lk.LoraConfig(rank=4, use_dora=True, target_modules=TARGETS))
    with pytest.raises(ValueError, match="DoRA"):
        groups.group_projections(dora)
    _, grouped, _ = _pair(0.0)
    with pytest.raises(ValueError, match="already grouped"):
        groups.group_projections(grouped)

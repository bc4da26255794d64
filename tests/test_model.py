"""Whole models: inject into tiny Llama / GPT-2 / BERT, train, merge, several adapters, PiSSA, LoRA+."""
import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.layers import LoRAEmbedding, LoRALinear

from .models import BUILDERS, logits, randomize_adapters, tiny_gpt2, tiny_llama, tokens


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_inject_defaults_equal_base_at_init(family):
    model = BUILDERS[family]()
    ids = tokens()
    before = logits(model, ids)
    names = lk.inject(model, lk.LoraConfig(rank=4))
    expected = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}[family]
    assert names and all(n.split(".")[-1] in expected for n in names)
    assert {n.split(".")[-1] for n in names} == set(expected)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_training_changes_only_adapters_and_merge_preserves_logits(family, use_dora):
    model = BUILDERS[family]()
    target = "all-linear" if family != "gpt2" else ["c_attn", "c_fc", "c_proj"]
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=target, use_dora=use_dora, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(seq=12)
    model.train()
    for _ in range(3):
        out = model(input_ids=ids, labels=ids if family != "bert" else torch.tensor([0, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable and ("lora_B" in n or "lora_A" in n or "magnitude" in n)) or (
            n in trainable and not changed), n
        if n not in trainable:
            assert not changed, f"frozen parameter {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    ref = logits(model, ids)
    lk.merge(model)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    lk.unmerge(model)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    lk.merge_and_unload(model)
    assert not lk.model.lora_layers(model)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_gpt2_fused_c_attn_changes_only_q_and_v_slices():
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    names = lk.inject(model, lk.LoraConfig(rank=4))  # GPT-2 default: c_attn with enable_lora [q, k, v] = [T, F, T]
    layer = model.get_submodule(names[0])
    assert layer.active.enable_lora == [True, False, True]
    assert layer.lora_A.shape == (8, 32) and layer.lora_B.shape == (64, 4)
    randomize_adapters(model)
    x = torch.randn(3, 5, 32)
    ours = layer(x)
    theirs = base.get_submodule(names[0])(x)
    d = 32
    torch.testing.assert_close(ours[..., d:2 * d], theirs[..., d:2 * d], rtol=0, atol=0)  # k untouched
    assert not torch.allclose(ours[..., :d], theirs[..., :d])
    assert not torch.allclose(ours[..., 2 * d:], theirs[..., 2 * d:])
    # training never moves k: its block of the full B stays exactly zero
    layer(x).pow(2).sum().backward()
    full_b = layer.active.full_b()
    assert torch.equal(full_b[d:2 * d], torch.zeros_like(full_b[d:2 * d]))


def test_several_adapters_switch_disable_delete():
    model = tiny_llama()
    ids = tokens()
    base_logits = logits(model, ids)
    lk.inject(model, lk.LoraConfig(rank=4), adapter_name="a")
    randomize_adapters(model, seed=1)
    logits_a = logits(model, ids)
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj"]), adapter_name="b")
    assert lk.list_adapters(model) == ["a", "b"]
    torch.testing.assert_close(logits(model, ids), logits_a)  # "a" still active
    with torch.no_grad():
        for layer in lk.model.lora_layers(model).values():
            if "b" in layer.adapters:
                layer.adapters["b"].lora_B.normal_()
    lk.set_adapter(model, "b")
    logits_b = logits(model, ids)
    assert not torch.allclose(logits_b, logits_a)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    # a model with only adapter b gives the same logits
    only_b = tiny_llama()
    lk.inject(only_b, lk.LoraConfig(rank=2, target_modules=["q_proj"]), adapter_name="b")
    only_b.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapters.a." not in k}, strict=False)
    torch.testing.assert_close(logits(only_b, ids), logits_b)
    with lk.adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), base_logits)
    lk.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, ids), logits_a)
    with pytest.raises(RuntimeError, match="active"):
        lk.delete_adapter(model, "a")
    lk.delete_adapter(model, "b")
    assert lk.list_adapters(model) == ["a"]
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        lk.set_adapter(model, "b")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_output_and_moves_weight(init):
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lk.inject(model, lk.LoraConfig(rank=4, init=init))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_B.abs().sum() > 0 and layer.lora_A.abs().sum() > 0
    assert not torch.allclose(layer.weight, w0)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    if init == "pissa":  # the adapter holds the top-r singular directions of W
        s = torch.linalg.svdvals(w0)
        assert torch.linalg.svdvals(layer.delta_weight())[:4] == pytest.approx(s[:4].tolist(), rel=1e-4)


def test_embedding_lora_and_rslora_scale():
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    names = lk.inject(model, lk.LoraConfig(rank=4, alpha=8, target_modules=["embed_tokens", "q_proj"],
                                           use_rslora=True))
    emb = model.get_submodule("model.embed_tokens")
    assert isinstance(emb, LoRAEmbedding) and "model.embed_tokens" in names
    assert emb.scale == pytest.approx(8 / 2)
    torch.testing.assert_close(logits(model, ids), before)
    with torch.no_grad():
        emb.lora_A.normal_()
    after = logits(model, ids)
    assert not torch.allclose(after, before)
    lk.merge(model)
    torch.testing.assert_close(logits(model, ids), after, rtol=1e-5, atol=1e-5)


def test_loraplus_groups():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "embed_tokens"]))
    groups = {g["name"]: g for g in lk.loraplus_param_groups(model, lr=1e-3, ratio=16)}
    assert groups["A"]["lr"] == 1e-3 and groups["B"]["lr"] == pytest.approx(16e-3)
    assert groups["embedding"]["lr"] == 1e-6
    b_ids = {id(m.lora_B) for n, m in lk.model.lora_layers(model).items() if isinstance(m, LoRALinear)}
    assert {id(p) for p in groups["B"]["params"]} == b_ids
    torch.optim.AdamW(lk.loraplus_param_groups(model, lr=1e-3))  # accepted by a torch optimizer


def test_bias_modes():
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(rank=2, bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)
    assert not any(n.endswith("c_fc.bias") for n in trainable)
    lk.mark_only_lora_as_trainable(model, bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_fc.bias") for n in trainable)


def test_safe_merge_refuses_non_finite_and_writes_nothing():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=2))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.self_attn.v_proj"):
        lk.safe_merge(model)
    for n, p in model.named_parameters():
        if "lora_B" not in n:
            assert torch.equal(p, weights[n]), n
    assert not any(m.merged for m in lk.model.lora_layers(model).values())


def test_bad_config_and_targets():
    model = tiny_llama()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        lk.inject(model, lk.LoraConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="no default"):
        lk.inject(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig())
    for bad, exc in [(dict(rank=0), ValueError), (dict(dropout=1.5), ValueError), (dict(init="lora"), ValueError),
                     (dict(bias="some"), ValueError), (dict(alpha=float("nan")), TypeError),
                     (dict(enable_lora={"c_attn": [False, False]}), ValueError)]:
        with pytest.raises(exc):
            lk.LoraConfig(**bad)
    with pytest.raises(TypeError, match="config"):
        lk.inject(model, {"rank": 4})
    assert not lk.model.lora_layers(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_merging_a_tied_embedding_is_refused():
    """GPT-2 ties lm_head.weight to wte.weight: merging an embedding adapter would change the head."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["wte", "c_fc"]))
    w = model.transformer.wte.base_layer.weight.detach().clone()
    for fn in (lk.merge, lk.safe_merge, lk.merge_and_unload):
        with pytest.raises(RuntimeError, match="tied to 'lm_head'"):
            fn(model)
    assert torch.equal(model.transformer.wte.base_layer.weight, w)
    assert not any(m.merged for m in lk.model.lora_layers(model).values())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_new_layers_keep_the_models_train_or_eval_mode(tmp_path):
    model = _mlp().eval()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0", "2"], dropout=0.5))
    assert not model[0].training and not model[2].training
    x = torch.randn(5, 8)
    randomize_adapters(model)
    assert torch.equal(model(x), model(x)), "dropout must be off in eval mode"
    lk.save_adapter(model, tmp_path)
    fresh = _mlp().eval()
    lk.load_adapter(fresh, tmp_path)
    assert not fresh[0].training
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_one_adapter_active_per_model_and_merge_skips_layers_without_one():
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]), adapter_name="a")
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["2"]), adapter_name="b")
    assert model[0].active_adapter == "a" and model[2].active_adapter is None  # "a" stays the model's adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.adapters.a.lora_A", "0.adapters.a.lora_B"}
    lk.set_adapter(model, "b")
    assert model[0].active_adapter is None and model[2].active_adapter == "b"
    randomize_adapters(model)
    x = torch.randn(4, 8)
    before = model(x)
    lk.merge(model)
    assert not model[0].merged and model[2].merged
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    lk.unmerge(model)
    lk.safe_merge(model)
    lk.merge_and_unload(model)
    assert not lk.model.lora_layers(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_pissa_adapter_reloads_exactly_and_pissa_niter_is_refused_at_save(tmp_path):
    model = _mlp()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0", "2"], init="pissa"), adapter_name="foo")
    with torch.no_grad():  # train a little: A and B move away from the SVD
        for layer in lk.model.lora_layers(model).values():
            layer.lora_B.add_(0.05)
    x = torch.randn(5, 8)
    lk.save_adapter(model, tmp_path, "foo")
    lk.load_adapter(base, tmp_path, "foo")
    torch.testing.assert_close(base(x), model(x), rtol=1e-5, atol=1e-5)
    other = _mlp()
    lk.inject(other, lk.LoraConfig(rank=2, target_modules=["0"], init="pissa_niter_2"))
    with pytest.raises(ValueError, match="randomized SVD"):
        lk.save_adapter(other, tmp_path / "niter")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_round_trip(bias, tmp_path):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"], bias=bias))
    with torch.no_grad():
        model[0].base_layer.bias.add_(1.0)
        model[2].bias.add_(1.0)
    lk.save_adapter(model, tmp_path)
    fresh = _mlp()
    lk.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh[0](x), model[0](x), rtol=0, atol=0)  # the adapted layer's bias: both modes
    if bias == "all":  # every bias trains, so every bias is saved
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

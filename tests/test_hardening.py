"""Issue 20: the model-level code around the kernels — adapter files, model surgery, hostile config
values — either gives the right numbers or refuses with an error naming the argument / file.
One test (or a parametrised group) per reproducer of the issue, numbered as there."""
import copy
import json
import threading
import time

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.model import lora_layers

from .models import logits, randomize_adapters, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _peft_save(base, tmp_path, **cfg):
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).eval()
    with torch.no_grad():  # move B away from its init so the adapter matters
        g = torch.Generator().manual_seed(5)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path))
    return peft_model


# 1. PEFT config keys that change the maths: applied (olora) or refused by name -------------------


def test_1_olora_adapter_loads_like_peft_reloads_it(tmp_path):
    base = tiny_llama()
    _peft_save(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")
    ids = tokens()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(reloaded, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key, cfg", [
    ("pissa_niter_4", dict(init_lora_weights="pissa_niter_4")),
    ("alora_invocation_tokens", dict(alora_invocation_tokens=[3, 4])),
])
def test_1_peft_keys_we_cannot_reproduce_are_refused_by_name(key, cfg, tmp_path):
    base = tiny_llama()
    _peft_save(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **cfg)
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError, match=key):
        lk.load_adapter(model, tmp_path)
    _assert_state(model, before)


@pytest.mark.parametrize("key, value", [
    ("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 1]]), ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"), ("init_lora_weights", "mica"), ("kasa_config", {"x": 1}),
    ("modules_to_save", ["lm_head"]), ("some_future_key", 3),
])
def test_1_other_maths_changing_or_unknown_keys_are_refused_by_name(key, value, tmp_path):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]))
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        lk.load_adapter(_mlp(), tmp_path)


def test_1_harmless_peft_keys_are_accepted(tmp_path):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(revision="main", layers_to_transform=None, megatron_core="megatron.core", eva_config=None,
               init_lora_weights="gaussian", runtime_config={"ephemeral_gpu_offload": False}, peft_version="0.21.2")
    path.write_text(json.dumps(cfg))
    fresh = _mlp()
    lk.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# 2. per-layer rsLoRA (and everything else that sets the scale) survives the round trip ----------


def test_2_mixed_rslora_round_trips_exactly(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, target_modules=["q_proj"], use_rslora=True))
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, target_modules=["v_proj"], use_rslora=False, dropout=0.1))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path)
    for name, layer in lora_layers(model).items():
        other = again.get_submodule(name)
        assert other.scale == layer.scale and other.dropout == layer.dropout, name
    ids = tokens()
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
    # PEFT reads the same scales from adapter_config.json alone
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


# 3. merging a weight tied to another module is refused ---------------------------------------------


def test_3_merging_lm_head_tied_to_the_embedding_is_refused():
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["lm_head", "c_fc"]))
    randomize_adapters(model)
    before = _state(model)
    for fn in (lk.merge, lk.safe_merge, lk.merge_and_unload):
        with pytest.raises(RuntimeError, match="tied to 'transformer.wte'"):
            fn(model)
        _assert_state(model, before)


# 4. the root module is never wrapped ------------------------------------------------------------


def test_4_a_bare_linear_cannot_be_its_own_target():
    lin = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="model itself"):
        lk.inject(lin, lk.LoraConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match="model itself"):
        lk.inject(lin, lk.LoraConfig(target_modules=".*"))
    assert not lk.model.lora_layers(lin)
    repr(lin), lin.state_dict()


# 5. modules whose parent bypasses their forward ------------------------------------------------


def test_5_multihead_attention_out_proj_is_skipped_by_all_linear_and_refused_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2)
    with pytest.warns(UserWarning, match="attn.out_proj"):
        names = lk.inject(copy.deepcopy(model), lk.LoraConfig(rank=2, target_modules="all-linear"))
    assert names == ["0"]
    with pytest.raises(ValueError, match="attn.out_proj.*MultiheadAttention"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["out_proj"]))


def test_5_transformer_encoder_layer_linears_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16))
    with pytest.raises(ValueError, match="TransformerEncoderLayer"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["linear1"]))
    with pytest.raises(ValueError, match="no module"):  # all-linear: every candidate skipped
        with pytest.warns(UserWarning):
            lk.inject(model, lk.LoraConfig(rank=2, target_modules="all-linear"))


# 6, 7. adding adapters to merged or PiSSA-rewritten layers ------------------------------------


def test_6_adding_an_adapter_to_a_merged_layer_is_refused():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj"]), adapter_name="a")
    randomize_adapters(model)
    lk.merge(model)
    before = _state(model)
    with pytest.raises(RuntimeError, match="merged"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj"], use_dora=True), adapter_name="b")
    _assert_state(model, before)


def test_7_pissa_next_to_another_adapter_is_refused_both_ways():
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]), adapter_name="a")
    before = _state(model)
    with pytest.raises(ValueError, match="pissa.*shared"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"], init="pissa"), adapter_name="b")
    _assert_state(model, before)
    other = _mlp()
    lk.inject(other, lk.LoraConfig(rank=2, target_modules=["0"], init="pissa"), adapter_name="a")
    before = _state(other)
    with pytest.raises(ValueError, match="pissa.*shared"):
        lk.inject(other, lk.LoraConfig(rank=2, target_modules=["0"]), adapter_name="b")
    _assert_state(other, before)


# 8. forward-mode AD -----------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_8_forward_mode_ad_is_refused_not_zero(dora):
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b, m = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), torch.rand(6, generator=g) + 1

    def f(x):
        if dora:
            return lk.dora_linear(x, w, a, b, m, 2.0, backend="torch")
        return lk.lora_linear(x, w, a, b, 2.0, backend="torch")

    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            f(fwAD.make_dual(x, torch.ones_like(x)))
    # reverse mode is unaffected
    y = f(x.clone().requires_grad_(True))
    assert y.shape == (4, 6)


# 9. a merged model's state dict carries the merged flag ------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_9_merged_state_dict_loads_into_a_fresh_model_once(use_dora):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0", "2"], use_dora=use_dora))
    randomize_adapters(model)
    x = torch.randn(5, 8)
    expected = model(x)
    lk.merge(model)
    state = model.state_dict()
    fresh = _mlp(seed=1)
    lk.inject(fresh, lk.LoraConfig(rank=2, target_modules=["0", "2"], use_dora=use_dora))
    fresh.load_state_dict(state)
    assert all(m.merged for m in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    lk.unmerge(fresh)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    # and the other way: an unmerged state dict into a merged model
    lk.merge(fresh)
    fresh.load_state_dict(_unmerged_state(model))
    assert not any(m.merged for m in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def _unmerged_state(model):
    lk.unmerge(model)
    return model.state_dict()


# 10. forward in one thread while another merges/unmerges --------------------------------------


def test_10_forward_during_merge_unmerge_is_consistent():
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(64, 64), rank=8, alpha=16, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(32, 64)
    expected = layer(x).detach()
    stop = threading.Event()
    errors = []

    def toggler():
        while not stop.is_set():
            layer.merge()
            layer.unmerge()

    t = threading.Thread(target=toggler)
    t.start()
    try:
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline and n < 300:
            with torch.no_grad():
                y = layer(x)
            if not torch.allclose(y, expected, rtol=1e-4, atol=1e-4):
                errors.append(n)
            n += 1
    finally:
        stop.set()
        t.join()
    assert not errors, f"{len(errors)}/{n} forwards saw a half-merged layer"


def test_10_layers_still_copy_and_pickle():
    import pickle

    layer = lk.LoRALinear(nn.Linear(8, 8), rank=2, alpha=4)
    copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))


# 12. hostile patterns -----------------------------------------------------------------------------


def test_12_catastrophic_rank_pattern_is_refused_quickly(tmp_path):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]))
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["rank_pattern"] = {"([a-z_.0-9]*)*X": 4}
    path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"rank_pattern.*\(\[a-z_\.0-9\]\*\)\*X.*adapter_config.json"):
        lk.load_adapter(_mlp(), tmp_path)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("pattern", ["(a+)+b", "(a|aa)*b", "(.*)*", r"(\w+\s?)+$", r"(a)\1", ".*.*.*x", "a" * 600,
                                     "(a?)" * 30 + "X", "a{0,50}a{0,50}a{0,50}X", "(?=a)a",
                                     "(ab|b)(ab|b)(ab|b)(ab|b)(ab|b)(ab|b)X"])
def test_12_unsafe_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="rank_pattern"):
        lk.LoraConfig(rank_pattern={pattern: 4})


def test_12_the_worst_accepted_patterns_stay_fast():
    name = "a" * 200
    for pattern in [".*a.*a", "(a?)" * 5 + ".*.*X", "(aa|a)(aa|a)(a|aa|aaa)?[a-z]*[a-z]+X", r"(\w|a)+(b|\w)+X",
                    "a{0,200}a*X"]:
        cfg = lk.LoraConfig(rank=2, rank_pattern={pattern: 4})
        t0 = time.monotonic()
        cfg.rank_for(name + "b")
        cfg.rank_for(name)
        assert time.monotonic() - t0 < 2, pattern


@pytest.mark.parametrize("pattern", ["q_proj", r"model\.layers\.0\.self_attn\.q_proj", r"layers\.[0-9]+\.mlp\..*",
                                     "(q|v)_proj", ".*attn.*"])
def test_12_ordinary_patterns_match_like_peft(pattern):
    import re

    cfg = lk.LoraConfig(rank=2, rank_pattern={pattern: 6})
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "model.layers.1.self_attn.v_proj",
                 "q_proj", "lm_head"]:
        peft_rank = 6 if re.match(rf"(.*\.)?({pattern})$", name) else 2
        assert cfg.rank_for(name) == peft_rank, (pattern, name)


# 13. a failing load_adapter restores requires_grad and everything else ------------------------


def test_13_failed_load_leaves_model_unchanged(tmp_path):
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("adapter_config.json", "lora_kernels.json"):
        (bad / f).write_text((tmp_path / f).read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] + 1.0  # no longer block-diagonal
    save_file(tensors, bad / "adapter_model.safetensors")
    fresh = tiny_gpt2()
    for p in fresh.parameters():
        p.requires_grad_(True)
    before = _state(fresh)
    for args in [(bad,), (tmp_path, "x.y"), (tmp_path, "")]:
        with pytest.raises(ValueError):
            lk.load_adapter(fresh, *args)
        _assert_state(fresh, before)


# 14. bad pattern values: refused at construction, naming the field -----------------------------


@pytest.mark.parametrize("field, value, exc", [
    ("alpha_pattern", {"v_proj": float("nan")}, ValueError), ("alpha_pattern", {"v_proj": "abc"}, TypeError),
    ("alpha_pattern", {"v_proj": -1.0}, ValueError), ("rank_pattern", {"v_proj": 2.5}, TypeError),
    ("rank_pattern", {"v_proj": -2}, ValueError), ("rank_pattern", ["v_proj"], TypeError),
    ("alpha_pattern", {3: 1.0}, TypeError),
])
def test_14_bad_pattern_values_name_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        lk.LoraConfig(rank=2, **{field: value})


def test_14_bad_alpha_pattern_from_file_names_it_and_changes_nothing(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fresh = tiny_llama()
    before = _state(fresh)
    for value in ["abc", None, [1]]:
        cfg["alpha_pattern"] = {"v_proj": value}
        path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="alpha_pattern"):
            lk.load_adapter(fresh, tmp_path)
        _assert_state(fresh, before)
    text = path.read_text().replace('"alpha_pattern": {"v_proj": [1]}', '"alpha_pattern": {"v_proj": NaN}')
    path.write_text(text)
    with pytest.raises(ValueError, match="alpha_pattern"):
        lk.load_adapter(fresh, tmp_path)
    _assert_state(fresh, before)


# 15. safe_merge with a zero DoRA magnitude merges nothing -------------------------------------


@pytest.mark.parametrize("fn", ["merge", "safe_merge"])
def test_15_zero_dora_magnitude_merges_nothing(fn):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_magnitude[0] = 0.0
    before = _state(model)
    with pytest.raises((RuntimeError, ValueError), match="layers.1.self_attn.v_proj"):
        getattr(lk, fn)(model)
    _assert_state(model, before)


# 16. clear errors ---------------------------------------------------------------------------------


def test_16_bad_target_regex_names_the_argument():
    with pytest.raises(ValueError, match="target_modules"):
        lk.inject(_mlp(), lk.LoraConfig(target_modules="(unclosed"))
    with pytest.raises(ValueError, match="rank_pattern"):
        lk.LoraConfig(rank_pattern={"(unclosed": 2})


@pytest.mark.parametrize("sidecar", [[1, 2], {"enable_lora": "yes"}, {"enable_lora": {"0": "yes"}},
                                     {"layers": [1]}, {"layers": {"0": {"rank": "x"}}}])
def test_16_malformed_sidecar_is_refused_naming_the_file(sidecar, tmp_path):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]))
    lk.save_adapter(model, tmp_path)
    (tmp_path / "lora_kernels.json").write_text(json.dumps(sidecar))
    fresh = _mlp()
    before = _state(fresh)
    with pytest.raises(ValueError, match="lora_kernels.json"):
        lk.load_adapter(fresh, tmp_path)
    _assert_state(fresh, before)


def test_16_enable_lora_must_be_a_dict_of_bool_lists():
    with pytest.raises(TypeError, match="enable_lora"):
        lk.LoraConfig(enable_lora="yes")
    with pytest.raises((TypeError, ValueError), match="enable_lora"):
        lk.LoraConfig(enable_lora={"c_attn": "yes"})


def test_16_peft_lora_bias_adapter_is_refused_by_name(tmp_path):
    base = tiny_llama()
    _peft_save(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias"):
        lk.load_adapter(copy.deepcopy(base), tmp_path)


def test_16_merge_and_unmerge_without_anything_to_do_are_errors():
    with pytest.raises(ValueError, match="no LoRA"):
        lk.merge(_mlp())
    with pytest.raises(ValueError, match="no LoRA"):
        lk.safe_merge(_mlp())
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0"]))
    with pytest.raises(RuntimeError, match="nothing is merged"):
        lk.unmerge(model)


# every refused call leaves the model exactly as it was ----------------------------------------


def _state(model):
    """Everything a refused call must leave alone: tensors, requires_grad, module tree, adapter flags."""
    tree = []
    for name, m in model.named_modules():
        flags = ()
        if isinstance(m, lk.model.LORA_LAYERS):
            flags = (m.active_adapter, m.merged_adapter, m.disabled, tuple(m.adapters))
        tree.append((name, type(m).__name__, id(m), flags))
    configs = dict(getattr(model, "lora_configs", {}) or {})
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, tree, configs)


def _assert_state(model, before):
    sd, rg, tree, configs = before
    now = _state(model)
    assert now[2] == tree
    assert now[1] == rg
    assert now[0].keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[0][k], sd[k]), k
    assert now[3] == configs


def test_every_refused_call_leaves_the_model_unchanged(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj"], use_dora=True), adapter_name="b")
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path / "a", "a")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["a"].lora_B[0, 0] = float("inf")
    refused = [
        lambda: lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj", "k_proj"]), adapter_name="a"),
        lambda: lk.inject(model, lk.LoraConfig(rank=2, target_modules=["k_proj", "embed_tokens"], use_dora=True),
                          adapter_name="c"),
        lambda: lk.inject(model, lk.LoraConfig(rank=2, target_modules=["nothing"]), adapter_name="c"),
        lambda: lk.load_adapter(model, tmp_path / "a", "a"),
        lambda: lk.load_adapter(model, tmp_path / "a", "b.c"),
        lambda: lk.load_adapter(model, tmp_path / "missing", "c"),
        lambda: lk.safe_merge(model),
        lambda: lk.unmerge(model),
        lambda: lk.set_adapter(model, "zzz"),
        lambda: lk.delete_adapter(model, "a"),
        lambda: lk.delete_adapter(model, "zzz"),
    ]
    for i, call in enumerate(refused):
        before = _state(model)
        with pytest.raises((ValueError, RuntimeError, KeyError, FileNotFoundError)):
            call()
        _assert_state(model, before)
    # merged: set_adapter to another, merge again, inject on the merged layer
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["a"].lora_B[0, 0] = 0.5
    lk.merge(model)
    for call in [lambda: lk.set_adapter(model, "b"), lambda: lk.merge(model),
                 lambda: lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj"]), adapter_name="c"),
                 lambda: lk.load_adapter(model, tmp_path / "a", "c")]:
        before = _state(model)
        with pytest.raises((ValueError, RuntimeError, KeyError)):
            call()
        _assert_state(model, before)


def test_1_olora_injected_round_trips_in_ours_and_peft(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    ids = tokens()
    before = logits(model, ids)
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], init="olora"))
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)  # unchanged at step 0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.add_(0.05)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_3_pissa_on_a_tied_weight_is_refused():
    model = tiny_gpt2()
    before = _state(model)
    with pytest.raises(ValueError, match="tied to 'transformer.wte'"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["lm_head"], init="pissa"))
    _assert_state(model, before)


def test_failure_half_way_through_inject_rolls_everything_back(monkeypatch):
    """A failure after some layers were built (here: the second PiSSA SVD) restores the rewritten
    weights, the module tree and requires_grad."""
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    before = _state(model)
    real = lk.LoRALinear._pissa_init
    calls = []

    def flaky(self, adapter, init):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("SVD failed")
        return real(self, adapter, init)

    monkeypatch.setattr(lk.LoRALinear, "_pissa_init", flaky)
    with pytest.raises(RuntimeError, match="SVD failed"):
        lk.inject(model, lk.LoraConfig(rank=2, target_modules=["q_proj", "v_proj"], init="pissa"))
    assert len(calls) == 2
    _assert_state(model, before)


def test_merge_failure_half_way_unmerges_what_was_merged(monkeypatch):
    model = _mlp()
    lk.inject(model, lk.LoraConfig(rank=2, target_modules=["0", "2"]))
    randomize_adapters(model)
    before = _state(model)
    real = lk.LoRALinear.merge

    def flaky(self, safe=False):
        if self is model[2]:
            raise RuntimeError("out of memory")
        return real(self, safe)

    monkeypatch.setattr(lk.LoRALinear, "merge", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        lk.merge(model)
    assert not model[0].merged
    sd = model.state_dict()
    for k, v in before[0].items():  # unmerge restores within one rounding
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6)


def test_9_merged_embedding_state_dict_loads_as_merged():
    def build(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
        lk.inject(m, lk.LoraConfig(rank=2, target_modules=["0", "1"]))
        return m

    model = build(0)
    randomize_adapters(model)
    ids = torch.tensor([[1, 2, 3]])
    expected = model(ids)
    lk.merge(model)
    fresh = build(1)
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].merged and fresh[1].merged
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-5, atol=1e-5)
    lk.unmerge(fresh)
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-5, atol=1e-5)

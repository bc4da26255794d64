"""PEFT compatibility: adapters saved by us load in PEFT and vice versa (same logits), our own round
trip is bit-exact, peft.convert gives PEFT's numbers on our kernels, and bad files are refused."""
import copy
import json
import os

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.peft import convert

from .models import SeededDropout, logits, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


CASES = {
    "llama-lora": (tiny_llama, dict(rank=4, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"])),
    "llama-dora-rslora": (tiny_llama, dict(rank=4, alpha=6, target_modules="all-linear", use_dora=True,
                                           use_rslora=True, rank_pattern={"v_proj": 2})),
    "gpt2-c_attn-slices": (tiny_gpt2, dict(rank=4, target_modules=["c_attn", "c_fc"],
                                           enable_lora={"c_attn": [True, False, True]})),
    "bert": (tiny_bert, dict(rank=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ours_saved_loads_in_peft_and_round_trips_exactly(case, tmp_path):
    build, kw = CASES[case]
    model = build()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(**kw))
    randomize_adapters(model)
    ids = tokens()
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "lora_kernels.json"]

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)

    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, ids), ours, rtol=0, atol=0)
    mine = lk.lora_state_dict(model)
    theirs = lk.lora_state_dict(again)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_peft_saved_loads_in_ours(build, use_dora, tmp_path):
    base = build()
    targets = ["q_proj", "v_proj", "embed_tokens"] if build is tiny_llama else ["c_attn", "c_proj"]
    if use_dora:
        targets = targets[:2]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ids = tokens()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    names = lk.load_adapter(ours, tmp_path)
    assert names
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


def _set_peft_dropout(peft_model, make):
    for module in peft_model.modules():
        if hasattr(module, "lora_dropout"):
            for name in list(module.lora_dropout):
                module.lora_dropout[name] = make()


def assert_convert_matches_peft(peft_model, p: float, converted_layers: int = 6) -> None:
    """``lk.peft.convert`` of ``peft_model`` gives PEFT's logits and every trainable gradient; at p > 0
    PEFT runs with :class:`SeededDropout` (our mask) for the reference."""
    if p > 0:
        _set_peft_dropout(peft_model, lambda: SeededDropout(p))
    peft_model.train()
    ids = tokens()

    def run():
        torch.manual_seed(1234)
        out = peft_model(input_ids=ids, labels=ids)
        params = [q for q in peft_model.parameters() if q.requires_grad]
        return out.logits.detach(), torch.autograd.grad(out.loss, params)

    ref_logits, ref_grads = run()
    if p > 0:  # our converted forward reads p from an nn.Dropout: put PEFT's kind back
        _set_peft_dropout(peft_model, lambda: nn.Dropout(p))
    converted, skipped = convert(peft_model)
    assert len(converted) == converted_layers and not skipped
    got_logits, got_grads = run()
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g_ours, g_ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_convert_matches_peft_outputs_and_gradients(p, use_dora):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=p,
                          init_lora_weights=False, use_dora=use_dora)
    assert_convert_matches_peft(peft.get_peft_model(tiny_llama(), cfg), p)


def test_converted_model_still_saves_with_peft(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), cfg).eval()
    ids = tokens()
    before = logits(peft_model, ids)
    convert(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)


def _saved(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=4))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    return tmp_path


def _assert_untouched(model, snapshot):
    assert not lk.model.lora_layers(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_bad_adapter_files_are_refused_and_leave_the_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _saved(tmp_path / "good")
    model = tiny_llama()
    snapshot = copy.deepcopy(model.state_dict())

    wrong_rank = tmp_path / "rank"
    os.makedirs(wrong_rank)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (wrong_rank / "adapter_config.json").write_text(json.dumps(cfg))
    (wrong_rank / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="says rank 8"):
        lk.load_adapter(model, wrong_rank)
    _assert_untouched(model, snapshot)

    missing = tmp_path / "missing"
    os.makedirs(missing)
    (missing / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    tensors = load_file(d / "adapter_model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("layers.1.self_attn.v_proj.lora_B.weight"))]
    save_file(tensors, missing / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"layers.1.self_attn.v_proj.*missing"):
        lk.load_adapter(model, missing)
    _assert_untouched(model, snapshot)

    corrupt = tmp_path / "corrupt"
    os.makedirs(corrupt)
    (corrupt / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    data = (d / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lk.load_adapter(model, corrupt)
    _assert_untouched(model, snapshot)

    (corrupt / "adapter_model.safetensors").write_bytes(data)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lk.load_adapter(model, corrupt)

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(model, tmp_path / "nowhere")

    other = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="modules the model lacks"):
        lk.load_adapter(other, d)
    _assert_untouched(model, snapshot)


def test_loading_twice_under_one_name_is_refused(tmp_path):
    d = _saved(tmp_path)
    model = tiny_llama()
    lk.load_adapter(model, d)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lk.load_adapter(model, d)
    lk.load_adapter(model, d, adapter_name="second")
    assert lk.list_adapters(model) == ["default", "second"]
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_peft_adapter_with_trained_biases_loads(tmp_path):
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, bias="lora_only")
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("c_attn.base_layer.bias"):
                p.add_(0.5)
    ids = tokens()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


def test_dora_on_an_embedding_is_refused_clearly(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path))
    snapshot = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="embed_tokens.*Embedding with a DoRA magnitude"):
        lk.load_adapter(base, tmp_path)
    _assert_untouched(base, snapshot)

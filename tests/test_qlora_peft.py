"""QLoRA interoperability with bitsandbytes and PEFT (optional extras: bitsandbytes, peft): a tiny Llama
whose Linear layers are bitsandbytes Linear4bit, adapted by PEFT (lora.bnb.Linear4bit), converted by
lk.peft.convert (outputs and gradients equal, dropout off and on with our seeded mask); adapters saved
on either side load on the other with equal logits; lk.inject on bitsandbytes layers directly."""
import copy
import logging

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.peft import convert, unconvert
from lora_kernels.qlora_layers import QLoRALinear, QuantLinear

from .models import logits, randomize_adapters, tokens
from .test_peft_compat import assert_convert_matches_peft

bnb = pytest.importorskip("bitsandbytes", reason="optional extra: pip install bitsandbytes (lora-kernels[qlora])")
peft = pytest.importorskip("peft")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _llama():
    """A tiny Llama whose in_features (64, 128) are multiples of bitsandbytes' blocksize 64: its CPU
    dequantisation kernel mis-scales blocks that straddle rows when in_features is a multiple of 16
    (e.g. the usual tiny 32; see test_quant_bnb.py), which would make bitsandbytes' own forward
    the wrong oracle."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _models(quant_type="nf4"):
    """(ours, theirs): theirs has its Linear layers (lm_head aside) replaced by bitsandbytes Linear4bit
    layers quantised by bitsandbytes itself (nested statistics, blocksize 64); ours has QuantLinear
    layers built from copies of those (same bytes)."""
    theirs = _llama()
    for name, module in list(theirs.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type=quant_type)
            layer.load_state_dict(module.state_dict())
            layer = layer.to("cpu")  # bitsandbytes quantises here
            parent, _, attr = name.rpartition(".")
            setattr(theirs.get_submodule(parent), attr, layer)
    theirs.is_loaded_in_4bit = True  # what transformers sets for BitsAndBytesConfig(load_in_4bit=True); PEFT reads it
    ours = copy.deepcopy(theirs)
    for name, module in list(ours.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent, _, attr = name.rpartition(".")
            setattr(ours.get_submodule(parent), attr, QuantLinear.from_bnb(module))
    del ours.is_loaded_in_4bit
    return ours.train(), theirs.train()  # train mode: no dropout in this config; no CPU repacking by bnb


def test_same_bytes_same_logits():
    ours, theirs = _models()
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_convert_peft_qlora_matches_outputs_and_gradients(p, use_dora):
    _, theirs = _models("fp4" if use_dora else "nf4")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=p,
                          init_lora_weights=False, use_dora=use_dora)
    peft_model = peft.get_peft_model(theirs, cfg)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("peft.tuners.lora.bnb")
    assert_convert_matches_peft(peft_model, p)
    unconvert(peft_model)
    assert not getattr(type(layer), "_lora_kernels_fused", False)


def test_peft_qlora_adapter_loads_in_ours(tmp_path):
    ours, theirs = _models()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(theirs, cfg)
    ids = tokens()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    names = lk.load_adapter(ours, tmp_path)
    assert len(names) == 6 and isinstance(ours.model.layers[1].mlp.up_proj, QLoRALinear)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_qlora_adapter_loads_in_peft(use_dora, tmp_path):
    ours, theirs = _models()
    lk.inject(ours, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    randomize_adapters(ours)
    ids = tokens()
    expected = logits(ours, ids)
    lk.save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(theirs, str(tmp_path)).train()
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)


def test_inject_on_bitsandbytes_layers_directly():
    ours, theirs = _models()
    config = lk.LoraConfig(rank=4, target_modules=["q_proj", "o_proj"])
    lk.inject(ours, config)
    lk.inject(theirs, config)
    layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QLoRALinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.weight.packed.data_ptr() == layer.base_layer.weight.data_ptr()  # read in place
    randomize_adapters(ours)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                theirs_params[name].copy_(param)
    ids = tokens()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantised"):
        layer.merge()
    assert isinstance(layer.base_layer.weight, bnb.nn.Params4bit)
    layer.unmerge()


def test_transformers_load_in_4bit_model_is_injected_as_is(tmp_path):
    """A model loaded with BitsAndBytesConfig(load_in_4bit=True): its Linear4bit layers are adapted in
    place; at step 0 (B = 0) the output is the 4-bit model's, and the adapters train."""
    import transformers

    _llama().save_pretrained(str(tmp_path))
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=qcfg,
                                                              device_map="cpu", dtype=torch.float32).train()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = tokens()
    base = logits(model, ids).detach()
    names = lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    assert len(names) == 4 and isinstance(model.model.layers[0].self_attn.q_proj, QLoRALinear)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_converted_peft_qlora_layer_pickles_and_deepcopies():
    """The converted class is module-level (lora_kernels.peft.bnb.Linear4bit): torch.save / pickle and
    deepcopy of a converted model work and keep the converted forward."""
    import io

    from lora_kernels.peft.bnb import Linear4bit as Converted

    _, theirs = _models()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(theirs, cfg)
    converted, skipped = convert(peft_model)
    assert len(converted) == 4 and not skipped
    ids = tokens()
    ref = logits(peft_model, ids)
    buf = io.BytesIO()
    torch.save(peft_model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(peft_model)):
        layer = other.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer) is Converted
        torch.testing.assert_close(logits(other, ids), ref, rtol=0, atol=0)
    unconvert(peft_model)
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj) is Converted.__mro__[1]


def test_converted_linear4bit_names_the_compile_reason_in_a_fresh_process():
    """Converting a PEFT lora.bnb.Linear4bit builds the compiler-disabled 4-bit entry points
    (docs/qlora.md), so a fullgraph compile of the converted model names qlora.COMPILE_REASON even with
    no eager call before it. Fresh process: once built, they stay built."""
    import os
    import subprocess
    import sys

    code = (
        # lora_kernels first: importing peft / bitsandbytes imports torch._dynamo, which would make the
        # import of lora_kernels build them (the conversion is what is tested here)
        "import sys, logging, torch\n"
        "from lora_kernels import qlora\n"
        "from lora_kernels.peft import convert\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "import peft, bitsandbytes as bnb\n"
        "logging.getLogger('bitsandbytes').setLevel(logging.ERROR)\n"
        "torch.manual_seed(0)\n"
        "class M(torch.nn.Module):\n"
        "    is_loaded_in_4bit = True\n"
        "    def __init__(s):\n"
        "        super().__init__()\n"
        "        s.p = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type='nf4')\n"
        "        s.p.weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.1, requires_grad=False, quant_type='nf4').to('cpu')\n"
        "    def forward(s, x): return s.p(x).relu()\n"
        "m = peft.get_peft_model(M(), peft.LoraConfig(r=4, target_modules=['p']))\n"
        "converted, skipped = convert(m)\n"
        "assert converted and not skipped, (converted, skipped)\n"
        "x = torch.randn(3, 64)\n"
        "try:\n"
        "    torch.compile(m, fullgraph=True, backend='eager')(x)\n"
        "    print('NO ERROR')\n"
        "except Exception as e:\n"
        "    print('NAMED' if qlora.COMPILE_REASON in str(e) else 'UNNAMED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "NAMED", r.stdout + r.stderr[-2000:]


def _two_layer_peft_model():
    """PEFT on two bitsandbytes Linear4bit layers p1, p2: adapter 'default' on p1 only, 'other' on p2 only."""
    torch.manual_seed(0)

    def lin():
        layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.1, requires_grad=False, quant_type="nf4").to("cpu")
        return layer

    class M(nn.Module):
        is_loaded_in_4bit = True

        def __init__(self):
            super().__init__()
            self.p1, self.p2 = lin(), lin()

        def forward(self, x):
            return self.p2(self.p1(x))

    m = peft.get_peft_model(M(), peft.LoraConfig(r=4, target_modules=["p1"]))
    m.add_adapter("other", peft.LoraConfig(r=4, target_modules=["p2"]))
    with torch.no_grad():  # B away from its zero init, so each adapter changes the output
        for module in m.modules():
            if isinstance(module, nn.Linear) and module.weight.shape == (64, 4):
                module.weight.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("active", ["default", "other"])
def test_converted_linear4bit_with_an_active_adapter_absent_from_the_layer(active):
    """Adapters targeting different modules: the layer without the active adapter returns its base output
    (as PEFT's forward does), the layer with it runs lora_kernels; the model's output equals PEFT's."""
    m = _two_layer_peft_model()
    m.set_adapter(active)
    x = torch.randn(3, 64)
    ref = m(x)
    with m.disable_adapter():
        assert (m(x) - ref).abs().max() > 1e-2  # the active adapter matters
    converted, skipped = convert(m)
    assert len(converted) == 2 and not skipped, (converted, skipped)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_converted_linear4bit_names_extra_forward_arguments():
    m = _two_layer_peft_model()
    convert(m)
    layer = m.base_model.model.p1
    with pytest.raises(NotImplementedError, match=r"1 positional, keywords \['scale'\]"):
        layer(torch.randn(3, 64), 5, scale=2.0)

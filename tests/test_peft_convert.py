"""lora_kernels.peft.convert on PEFT models in every state PEFT has: each converted model is compared
with an unconverted copy of the same PEFT model (PEFT is the oracle), outputs and gradients."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.dropout import dropout_mask
from lora_kernels.peft import convert, unconvert
from .models import SeededDropout

peft = pytest.importorskip("peft")
from peft.tuners import lora as peft_lora  # noqa: E402

from lora_kernels.peft import layers as peft_layers  # noqa: E402


class Net(nn.Module):
    """Every LoRA layer kind PEFT has, small: Embedding, Linear (with and without bias), Conv2d, MHA."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 16, bias=False)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.emb(ids)                                   # (B, T, 16)
        h = self.lin1(torch.relu(self.lin0(h)))
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.out(h)


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))


def _peft_model(targets=("emb", "lin0", "lin1"), seed=0, **kw):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **kw)
    return peft.get_peft_model(Net(), cfg)


def _pair(**kw):
    """(PEFT model, converted deep copy) — same weights, the copy's layers on lora_kernels."""
    ref = _peft_model(**kw)
    ours = copy.deepcopy(ref)
    converted, skipped = convert(ours)
    assert converted
    return ref, ours, converted, skipped


def _grads(model, ids=IDS):
    out = model(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(out.square().mean(), params)


def _assert_same(ref, ours, rtol=1e-5, atol=1e-6):
    y_ref, g_ref = _grads(ref)
    y, g = _grads(ours)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"lora_bias": True}, {"use_rslora": True}],
                         ids=["lora", "dora", "lora_bias", "rslora"])
def test_converted_layers_equal_peft(kw):
    kw = dict(kw)
    targets = kw.pop("target_modules_", ("emb", "lin0", "lin1") if not kw.get("lora_bias") else ("lin0", "out"))
    ref, ours, converted, skipped = _pair(targets=targets, **kw)
    assert sorted(converted) == sorted(f"base_model.model.{t}" for t in targets)
    assert not skipped
    kinds = {type(m) for m in ours.modules() if isinstance(m, peft_lora.LoraLayer)}
    assert kinds <= {peft_layers.Linear, peft_layers.Embedding}
    _assert_same(ref, ours)


def test_every_other_lora_layer_is_listed_in_skipped_with_its_reason():
    ref, ours, converted, skipped = _pair(targets=("emb", "lin0", "conv", "mha", "lin1"))
    assert sorted(converted) == ["base_model.model.emb", "base_model.model.lin0", "base_model.model.lin1"]
    assert set(skipped) == {"base_model.model.conv", "base_model.model.mha", "base_model.model.mha.base_layer.out_proj"}
    assert "Conv2d" in skipped["base_model.model.conv"] and "unfold" in skipped["base_model.model.conv"]
    assert "MultiheadAttention" in skipped["base_model.model.mha"]
    _assert_same(ref, ours)


def test_target_parameters_layer_is_listed_in_skipped():
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=[], target_parameters=["lin0.weight"], init_lora_weights=False)
    model = peft.get_peft_model(Net(), cfg)
    with pytest.warns(UserWarning, match="none convertible"):
        converted, skipped = convert(model)
    assert converted == [] and len(skipped) == 1
    assert "ParamWrapper" in next(iter(skipped.values()))


def test_nothing_to_convert_warns_and_returns_empty():
    with pytest.warns(UserWarning, match="no PEFT LoRA layer"):
        assert convert(Net()) == ([], {})
    torch.manual_seed(0)
    conv_only = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["conv"]))
    with pytest.warns(UserWarning, match="none convertible"):
        converted, skipped = convert(conv_only)
    assert converted == [] and list(skipped) == ["base_model.model.conv"]


def test_disable_adapter_on_a_merged_model_gives_the_base_output_as_peft_does():
    for kw in ({}, {"use_dora": True, "targets": ("lin0", "lin1")}):
        ref, ours, _, _ = _pair(**kw)
        base = ref.get_base_model()
        with ref.disable_adapter():
            y_base = ref(IDS)
        adapted = ours(IDS)
        assert (adapted - y_base).abs().max() > 1e-3  # the adapters change the output
        for m in (ref, ours):
            m.merge_adapter()
        with ours.disable_adapter():
            torch.testing.assert_close(ours(IDS), y_base, rtol=1e-5, atol=1e-5)
        with ref.disable_adapter():
            ref(IDS)
        # PEFT unmerges on the disabled forward and leaves the layers unmerged afterwards: same state here
        merged = lambda m: [x.merged for x in m.modules() if isinstance(x, peft_lora.LoraLayer)]  # noqa: E731
        assert merged(ours) == merged(ref) == [False] * len(merged(ref))
        torch.testing.assert_close(ours(IDS), adapted, rtol=1e-5, atol=1e-5)
        del base


def test_set_adapter_to_one_some_layers_lack():
    ref, ours, _, _ = _pair(targets=("emb", "lin0", "lin1"))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin1"], init_lora_weights=False)
    for m in (ref, ours):
        torch.manual_seed(5)
        m.add_adapter("second", cfg)
    convert(ours)
    for m in (ref, ours):
        m.set_adapter("second")
    _assert_same(ref, ours)


def test_several_active_adapters_and_mixed_batches_equal_peft():
    ref, ours, _, _ = _pair(targets=("emb", "lin0"))
    cfg = peft.LoraConfig(r=2, target_modules=["emb", "lin0"], init_lora_weights=False)
    for m in (ref, ours):
        torch.manual_seed(3)
        m.add_adapter("b", cfg)
        m.base_model.model.lin0.set_adapter(["default", "b"])  # several active: PEFT adds them up
    convert(ours)
    for m in (ref, ours):
        m.eval()
    torch.testing.assert_close(ours(IDS), ref(IDS), rtol=1e-5, atol=1e-6)
    for m in (ref, ours):
        m.base_model.model.lin0.set_adapter("default")
    names = ["default", "b", "__base__"]  # one per row (lin0: lora_kernels.multi; emb: PEFT's lookup)
    torch.testing.assert_close(ours(IDS, adapter_names=names), ref(IDS, adapter_names=names), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours(IDS, adapter_names=names), ours(IDS))
    # invalid calls: PEFT's own errors, word for word
    for m in (ref, ours):
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
            m(IDS, adapter_names=["default"])
    for m in (ref, ours):
        m.merge_adapter()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            m(IDS, adapter_names=names)


def test_adapter_added_after_convert_that_is_not_supported():
    ref, ours, _, _ = _pair(targets=("lin0",))
    cfg = peft.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="mica")
    ours.add_adapter("odd", cfg)
    ours.set_adapter("odd")
    with pytest.raises(NotImplementedError, match="variant MiCALinearVariant"):
        ours(IDS)
    converted, skipped = convert(ours)
    assert "base_model.model.lin0" in skipped and type(ours.base_model.model.lin0) is peft_lora.Linear
    ours(IDS)  # PEFT's forward again


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_with_a_trainable_base_weight_matches_peft(p):
    """FSDP(use_orig_params=True) hands the layer its weight with requires_grad=True; a user may also train it."""
    ref, ours, _, _ = _pair(targets=("lin0", "lin1"), use_dora=True, lora_dropout=p)
    for m in (ref, ours):
        for name, q in m.named_parameters():
            if name.endswith("base_layer.weight"):
                q.requires_grad_(True)
        m.train()
    if p > 0:  # PEFT side: nn.Dropout replaced by our seeded mask, so both sides drop the same elements
        for mod in ref.modules():
            if isinstance(mod, peft_lora.LoraLayer):
                for name in list(mod.lora_dropout):
                    mod.lora_dropout[name] = SeededDropout(p)
    torch.manual_seed(11)
    y_ref, g_ref = _grads(ref)
    torch.manual_seed(11)
    y, g = _grads(ours)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    names = [n for n, q in ours.named_parameters() if q.requires_grad]
    assert sum(n.endswith("base_layer.weight") for n in names) == 2
    for n, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_weight_gradient_against_float64(p):
    """dW of dora_linear (plain torch in the op's backward) against autograd through PEFT's formula, float64."""
    g = torch.Generator().manual_seed(0)
    m_, n, k, r, s, seed = 9, 6, 10, 3, 1.7, 1234
    x = torch.randn(m_, k, generator=g)
    w = torch.randn(n, k, generator=g)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    mag = torch.rand(n, generator=g) + 0.5
    gy = torch.randn(m_, n, generator=g)
    w_leaf = w.clone().requires_grad_(True)
    y = lk.dora_linear(x, w_leaf, a, b, mag, s, dropout_p=p, seed=seed, backend="torch")
    (dw,) = torch.autograd.grad(y, w_leaf, gy)

    xd64, w64 = x.double(), w.double().requires_grad_(True)
    if p > 0:
        xd64 = xd64 * dropout_mask(seed, m_, k, p, dtype=torch.float64, device="cpu")
    norm = (w64 + s * b.double() @ a.double()).norm(dim=1).detach()
    c = mag.double() / norm
    y64 = x.double() @ w64.t() + (c - 1) * (xd64 @ w64.t()) + c * s * (xd64 @ a.double().t() @ b.double().t())
    (dw64,) = torch.autograd.grad(y64, w64, gy.double())
    assert (dw.double() - dw64).norm() / dw64.norm() < 1e-5


def test_dora_weight_gradient_compiles_with_a_traced_seed():
    """seed=None under torch.compile is a traced tensor: dW's mask must be regenerated inside an op."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 12, generator=g), torch.randn(5, 12, generator=g)
    a, b, mag = torch.randn(3, 12, generator=g), torch.randn(5, 3, generator=g), torch.rand(5, generator=g) + 0.5

    def step(w_leaf):
        y = lk.dora_linear(x, w_leaf, a, b, mag, 0.8, dropout_p=0.4, backend="torch")
        return torch.autograd.grad(y.square().sum(), w_leaf)[0]

    torch.manual_seed(7)
    eager = step(w.clone().requires_grad_(True))
    torch._dynamo.reset()
    torch.manual_seed(7)
    compiled = torch.compile(lambda w_: lk.dora_linear(x, w_, a, b, mag, 0.8, dropout_p=0.4, backend="torch"),
                             backend="aot_eager", fullgraph=True)
    w_leaf = w.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(compiled(w_leaf).square().sum(), w_leaf)
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_pickle_deepcopy_and_repr_are_peft_s():
    ref, ours, _, _ = _pair(targets=("emb", "lin0", "lin1"))
    ours.eval()
    y = ours(IDS)
    assert repr(ours).count("lora.Linear(") == repr(ref).count("lora.Linear(") == 2
    assert repr(ours).count("lora.Embedding(") == 1
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(other.base_model.model.lin0) is peft_layers.Linear
        torch.testing.assert_close(other(IDS), y, rtol=0, atol=0)
    unconvert(ours)
    assert type(ours.base_model.model.lin0) is peft_lora.Linear
    torch.testing.assert_close(ours(IDS), y, rtol=1e-5, atol=1e-6)


def test_tensor_scaling_from_compiled_hotswap_compiles_once():
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    ref, ours, _, _ = _pair(targets=("lin0", "lin1"))
    for m in (ref, ours):
        m.eval()
        prepare_model_for_compiled_hotswap(m, target_rank=6)
    assert isinstance(ours.base_model.model.lin0.scaling["default"], torch.Tensor)
    torch.testing.assert_close(ours(IDS), ref(IDS), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(IDS)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for value in (0.5, 3.0):
                for m in (ref, ours):
                    for layer in m.modules():
                        if isinstance(layer, peft_lora.LoraLayer):
                            layer.scaling["default"].fill_(value)
                torch.testing.assert_close(compiled(IDS), ref(IDS), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_convert_twice_is_idempotent_and_training_matches():
    ref, ours, converted, _ = _pair(targets=("lin0", "lin1"), lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(ours)[0] == converted
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        for m, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            m(IDS).square().mean().backward()
            o.step()
    torch.testing.assert_close(ours(IDS), ref(IDS), rtol=1e-5, atol=1e-5)


class _ScaledEmbedding(nn.Embedding):
    """Gemma-style embedding: the lookup times embed_scale (PEFT scales the adapter term by it too)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.embed_scale = 2.5

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize("use_dora", [False, True])
def test_scaled_embedding_matches_peft(use_dora):
    def build():
        torch.manual_seed(0)
        net = Net()
        net.emb = _ScaledEmbedding(20, 16)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"], init_lora_weights=False, use_dora=use_dora)
        return peft.get_peft_model(net, cfg)

    ref, ours = build(), build()
    assert convert(ours)[0] == ["base_model.model.emb"]
    _assert_same(ref, ours)


def test_opcheck_dora_with_a_trainable_weight_and_the_dropout_op():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 10, generator=g), torch.randn(7, 10, generator=g).requires_grad_(True)
    a, b = torch.randn(3, 10, generator=g).requires_grad_(True), torch.randn(7, 3, generator=g).requires_grad_(True)
    mag = (torch.rand(7, generator=g) + 0.5).requires_grad_(True)
    seed = torch.tensor([99], dtype=torch.int64)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_fwd, (x, w, None, a, b, mag, 0.5, 0.2, 0, "torch", seed))
    torch.library.opcheck(torch.ops.lora_kernels.dropout_apply, (x, 0.2, 0, seed))
    torch.library.opcheck(torch.ops.lora_kernels.dropout_apply, (x, 0.0, 5))

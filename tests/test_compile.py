"""torch.compile(fullgraph=True): no graph breaks, compiled == eager (outputs and gradients), and the
seed handling that makes it possible (seed=None is drawn as an int64 CPU tensor and read inside the
custom op; a tensor seed changes without recompiling).

Model-level tests use the ``aot_eager`` backend (Dynamo + AOTAutograd, forward and backward graphs:
everything torch.compile does to our ops, which Inductor keeps opaque) because Inductor's C++
compilation costs about a minute for the whole model on a cold CPU cache; one test compiles the two
ops with Inductor (the default backend).
"""
from dataclasses import replace

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lora_kernels.functional as functional
from lora_kernels import dora_linear, lora_linear
from lora_kernels.dropout import draw_seed
from lora_kernels.testing import LoraCase, make_inputs
from tests.test_tiny_llama import TinyConfig, grads, lm_loss, make_model, make_tokens

MIXED = TinyConfig(use_dora=(False, True), dropout=0.1)  # block 0 LoRA, block 1 DoRA


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_model_has_no_graph_breaks():
    """(The checkpointed model is compiled with fullgraph=True below, which fails on any break.)"""
    model = make_model(MIXED)
    explanation = torch._dynamo.explain(lambda t: lm_loss(model, t))(make_tokens(MIXED))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_graph_break_check_catches_an_item_seed(monkeypatch):
    """The check above can fail: drawing the seed through .item() (the old code) breaks the graph."""
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(5, 6, 7, 2))

    def f(x):
        return lora_linear(x, w, a, b, 1.0, bias, dropout_p=0.1) * 2

    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    torch._dynamo.reset()
    monkeypatch.setattr(functional, "draw_seed_tensor", lambda: torch.tensor([draw_seed()]))
    counters.clear()
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count >= 1
    # (explain's break_reasons can come back empty for a break inside an inlined call; dynamo's
    # graph-break counters name it either way)
    reasons = [str(r.reason) for r in explanation.break_reasons] + list(counters["graph_break"])
    assert any("item()" in r for r in reasons), reasons


def _step(model, tokens, rng_seed):
    torch.manual_seed(rng_seed)
    loss = lm_loss(model, tokens)
    loss.backward()
    inner = getattr(model, "_orig_mod", model)
    g = grads(inner)
    inner.zero_grad(set_to_none=True)
    return loss.detach(), g


@pytest.mark.parametrize("cfg,checkpointing", [(MIXED, False), (replace(MIXED, use_dora=True, n_layers=1), True)],
                         ids=["lora+dora", "dora-checkpointed"])
def test_compiled_model_matches_eager(cfg, checkpointing):
    """fullgraph compile of a model with dropout (seed=None): same loss and gradients as the eager,
    non-checkpointed model under the same torch.manual_seed (so the same seeds are drawn — the
    compiled run is reproducible under manual_seed — and a checkpointed backward regenerates the
    forward's masks, its seeds being saved, not re-drawn); another RNG state gives other masks."""
    tokens = make_tokens(cfg)
    eager = make_model(cfg)
    compiled = torch.compile(make_model(cfg, checkpointing=checkpointing), backend="aot_eager", fullgraph=True)
    loss_e, grads_e = _step(eager, tokens, 5)
    loss_c, grads_c = _step(compiled, tokens, 5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)
    loss_c2, _ = _step(compiled, tokens, 6)
    assert loss_c2 != loss_c, "another RNG state must give other masks"


def test_inductor_compiles_both_ops_and_matches_eager():
    """Inductor (the default backend), fullgraph: LoRA then DoRA with dropout, seed=None and a tensor
    seed; outputs and all gradients equal eager; a new seed tensor value does not recompile. On a GPU
    the tensors are CUDA ones, so this compiles the Triton paths (backend 'auto')."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 16, generator=gen).to(device)
    w = (torch.randn(16, 16, generator=gen) / 4).to(device)
    params = [(torch.randn(4, 16, generator=gen) / 4).to(device), (torch.randn(16, 4, generator=gen) / 2).to(device),
              (torch.rand(16, generator=gen) + 0.5).to(device)]

    def f(x, a, b, m, seed):
        h = lora_linear(x, w, a, b, 2.0, dropout_p=0.25)
        return dora_linear(h, w, a, b, m, 2.0, dropout_p=0.25, seed=seed)

    def run(fn, seed, rng_seed):
        leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
        torch.manual_seed(rng_seed)
        y = fn(*leaves, seed)
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    compiled = torch.compile(f, fullgraph=True)
    for seed, rng_seed in [(torch.tensor([7]), 1), (torch.tensor([2**40 + 3]), 2)]:
        with torch._dynamo.config.patch(error_on_recompile=rng_seed == 2):
            outs_c = run(compiled, seed, rng_seed)
        outs_e = run(f, seed, rng_seed)
        for name, c, e in zip(["y", "dx", "dA", "dB", "dm"], outs_c, outs_e):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(run(f, torch.tensor([8]), 1)[0], outs_e[0])


@pytest.mark.interpreter
def test_tensor_seed_gives_the_int_seeds_mask_on_every_backend(kernel_device):
    x, w, a, b, bias, _, mag = make_inputs(LoraCase(40, 24, 48, 8, dora=True), kernel_device)
    seed = 2**33 + 11
    for backend in ("torch", "fused", "hybrid"):
        y_int = lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.3, seed=seed, backend=backend)
        y_t = lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.3, seed=torch.tensor([seed]), backend=backend)
        assert torch.equal(y_int, y_t), backend
        d_int = dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=0.3, seed=seed, backend=backend)
        d_t = dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=0.3, seed=torch.tensor(seed), backend=backend)
        assert torch.equal(d_int, d_t), backend
        if backend == "torch":
            y_torch = y_int
        else:
            torch.testing.assert_close(y_int, y_torch, rtol=1e-4, atol=1e-4)  # same mask: else O(1) apart


def test_opcheck_with_seed_tensor():
    x, w, a, b, bias, g, mag = make_inputs(LoraCase(20, 33, 40, 4, dora=True))
    seed = torch.tensor([12345])
    a.requires_grad_(True)
    mag.requires_grad_(True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compile: tests above
    fwd = (x, w, bias, a, b, 0.5, 0.1, 0, "torch", seed)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd, fwd, test_utils=checks)
    _, u = torch.ops.lora_kernels.lora_linear_fwd(*fwd)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd,
                          (g, x, w, a.detach(), b, u, 0.5, 0.1, 0, "torch", True, seed), test_utils=checks)
    dfwd = (x, w, bias, a, b, mag, 0.5, 0.1, 0, "torch", seed)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_fwd, dfwd, test_utils=checks)
    _, u, h, norm = torch.ops.lora_kernels.dora_linear_fwd(*dfwd)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_bwd,
                          (g, x, w, a.detach(), b, mag.detach(), u, h, norm, 0.5, 0.1, 0, "torch", True, seed),
                          test_utils=checks)


def test_seed_tensor_validation():
    x, w, a, b, bias, _, _ = make_inputs(LoraCase(5, 6, 7, 2))
    with pytest.raises(TypeError, match="seed"):
        lora_linear(x, w, a, b, 1.0, dropout_p=0.1, seed=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="seed"):
        lora_linear(x, w, a, b, 1.0, dropout_p=0.1, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, a, b, 1.0, dropout_p=0.1, seed=torch.tensor([-1]))

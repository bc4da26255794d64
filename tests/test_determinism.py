"""Deterministic mode: with torch.use_deterministic_algorithms(True) two runs give bit-identical
gradients — a few training steps of the tiny model (torch backend; CPU in CI), and the Triton paths'
forward and backward (natively on a GPU, in the interpreter on CPU)."""
import pytest
import torch

from lora_kernels import dora_linear, lora_linear
from lora_kernels.testing import LoraCase, make_inputs
from tests.test_tiny_llama import TinyConfig, grads, lm_loss, make_model, make_tokens

CFG = TinyConfig(use_dora=(False, True), dropout=0.1)


@pytest.fixture
def deterministic(monkeypatch):
    if torch.cuda.is_available():  # cuBLAS refuses deterministic mode without a fixed workspace
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _train(rng_seed, steps=2):
    """Per step, the gradients; at the end, the parameters. Dropout seeds drawn (seed=None)."""
    model = make_model(CFG)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(rng_seed)
    history = []
    for step in range(steps):
        lm_loss(model, make_tokens(CFG, seed=step)).backward()
        history.append(grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_steps_are_bitwise_reproducible(deterministic):
    hist1, params1 = _train(0)
    hist2, params2 = _train(0)
    for step, (g1, g2) in enumerate(zip(hist1, hist2)):
        for name in g1:
            assert torch.equal(g1[name], g2[name]), f"step {step}: {name}"
    for name in params1:
        assert torch.equal(params1[name], params2[name]), name
    other, _ = _train(1, steps=1)  # the control: another RNG state, other masks, other gradients
    assert any(not torch.equal(other[0][n], hist1[0][n]) for n in other[0])


def _fwd_bwd(backend, inputs, dora):
    x, w, a, b, bias, g, mag = (t.clone() if t is not None else None for t in inputs)
    leaves = [t.requires_grad_(True) for t in (x, a, b, mag)]
    if dora:
        y = dora_linear(x, w, a, b, mag, 2.0, bias, dropout_p=0.1, seed=99, backend=backend)
    else:
        y = lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.1, seed=99, backend=backend)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves if t.grad is not None]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["fused", "hybrid"])
def test_triton_paths_are_bitwise_reproducible(kernel_device, deterministic, backend):
    m = 4096 if kernel_device == "cuda" else 80  # several row blocks, so the split reductions are exercised
    for dtype in ([torch.float32, torch.bfloat16] if kernel_device == "cuda" else [torch.float32]):
        inputs = make_inputs(LoraCase(m, 96, 128, 16, dtype=dtype, dora=True), kernel_device)
        for dora in (False, True):
            first = _fwd_bwd(backend, inputs, dora)
            second = _fwd_bwd(backend, inputs, dora)
            assert len(first) == (5 if dora else 4)
            for i, (u, v) in enumerate(zip(first, second)):
                assert torch.equal(u, v), f"{backend} dora={dora} {dtype}: output {i} differs between runs"

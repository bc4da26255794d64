"""Activation checkpointing (torch.utils.checkpoint, non-reentrant) around blocks whose LoRA / DoRA
projections use dropout: the recomputed forward re-draws the same seeds — hence the same masks —
because checkpoint restores the CPU RNG state, which the seed (seed=None) is drawn from; gradients
equal the non-checkpointed run's. (The compiled variant is in test_compile.py.)"""
import contextlib

import pytest
import torch

import lora_kernels.functional as functional
from tests.test_tiny_llama import TinyConfig, grads, lm_loss, make_model, make_tokens

CFG = TinyConfig(use_dora=(False, True), dropout=0.2)


@contextlib.contextmanager
def recording_seeds():
    """Yields the list of the seeds lora_linear / dora_linear draw (seed=None) inside, in order."""
    seeds = []
    draw = functional.draw_seed_tensor

    def recording_draw():
        t = draw()
        seeds.append(int(t.item()))
        return t

    functional.draw_seed_tensor = recording_draw
    try:
        yield seeds
    finally:
        functional.draw_seed_tensor = draw


def _run(model, tokens):
    """(loss, gradients, seeds drawn) of one forward + backward from torch.manual_seed(11)."""
    with recording_seeds() as seeds:
        torch.manual_seed(11)
        loss = lm_loss(model, tokens)
        loss.backward()
    return loss.detach(), grads(model), seeds


@pytest.fixture(scope="module")
def reference():
    """The non-checkpointed run."""
    return _run(make_model(CFG), make_tokens(CFG))


N_PROJ = 7 * CFG.n_layers


def test_recomputation_redraws_the_forward_seeds_and_gradients_are_equal(reference):
    loss_ref, grads_ref, ref_seeds = reference
    assert len(ref_seeds) == N_PROJ and len(set(ref_seeds)) == N_PROJ
    loss, g, seeds = _run(make_model(CFG, checkpointing=True), make_tokens(CFG))
    assert len(seeds) == 2 * N_PROJ, "each projection draws once in forward and once in recomputation"
    assert seeds[:N_PROJ] == ref_seeds
    per_block = 7  # backward recomputes the last block first
    expected = [s for b in reversed(range(CFG.n_layers)) for s in ref_seeds[b * per_block:(b + 1) * per_block]]
    assert seeds[N_PROJ:] == expected, "the recomputation must re-draw the forward's seeds"
    assert torch.equal(loss, loss_ref)
    assert g.keys() == grads_ref.keys()
    for name in g:
        assert torch.equal(g[name], grads_ref[name]), name


def test_without_rng_state_restoration_the_masks_and_gradients_differ(reference):
    """The control: with preserve_rng_state=False the recomputation draws new seeds (other masks, wrong
    gradients, silently) — what the test above guards against."""
    _, grads_ref, _ = reference
    model = make_model(CFG, checkpointing=True)
    model.checkpoint_kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    _, g, seeds = _run(model, make_tokens(CFG))
    assert set(seeds[N_PROJ:]).isdisjoint(seeds[:N_PROJ])
    assert any(not torch.allclose(g[n], grads_ref[n]) for n in g)


def test_explicit_seeds_under_checkpointing_give_equal_gradients():
    """An explicit seed needs no RNG at all: the same mask in forward, recomputation and backward."""
    from torch.utils.checkpoint import checkpoint

    from lora_kernels import dora_linear, lora_linear

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, 16, generator=gen)
    w = torch.randn(16, 16, generator=gen) / 4
    a0 = torch.randn(4, 16, generator=gen) / 4
    b0 = torch.randn(16, 4, generator=gen)
    m0 = torch.rand(16, generator=gen) + 0.5

    def f(x, a, b, m):
        h = lora_linear(x, w, a, b, 2.0, dropout_p=0.5, seed=123)
        return dora_linear(torch.relu(h), w, a, b, m, 2.0, dropout_p=0.5, seed=2**40)

    out = []
    for ckpt in (False, True):
        a, b, m = (t.clone().requires_grad_(True) for t in (a0, b0, m0))
        y = checkpoint(f, x, a, b, m, use_reentrant=False, preserve_rng_state=False) if ckpt else f(x, a, b, m)
        y.square().sum().backward()
        out.append([y.detach(), a.grad, b.grad, m.grad])
    for ref, got in zip(*out):
        assert torch.equal(ref, got)

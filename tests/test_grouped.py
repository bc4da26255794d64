"""lora_kernels.grouped.grouped_lora: a shared-input projection group as one op.

Every output and gradient must equal separate ``lora_linear`` calls with the same seeds (and the
float64 reference), the masks bit for bit; the Triton backends launch ONE grouped shrink per group
and forward. Kernel cases run on CUDA when there is one, else in the Triton interpreter (small shapes).
"""
from __future__ import annotations

import pytest
import torch

from lora_kernels.dropout import dropout_mask
from lora_kernels.functional import lora_linear
from lora_kernels.grouped import grouped_lora
from lora_kernels.reference import lora_linear_ref
from lora_kernels.testing import TOLERANCES, rel_error

from .conftest import HAS_TRITON, KERNEL_DEVICE

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like fill with NaN: an output element no kernel wrote cannot pass."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", poisoned_like)


def make_group(k, ns, ranks, dtype, biases, device="cpu", lead=(37,), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(*lead, k)
    ws = [rnd(n, k, std=k ** -0.5) for n in ns]
    bs = [rnd(n) if has else None for n, has in zip(ns, biases)]
    a_s = [rnd(r, k, std=k ** -0.5) for r in ranks]
    b_s = [rnd(n, r, std=r ** -0.5) for n, r in zip(ns, ranks)]
    grads = [rnd(*lead, n) for n in ns]
    return x, ws, bs, a_s, b_s, grads


def leaves(x, bs, a_s, b_s):
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(True)

    return leaf(x), [leaf(b) for b in bs], [leaf(a) for a in a_s], [leaf(b) for b in b_s]


def flat(x, bs, a_s, b_s):
    return [x] + [b for b in bs if b is not None] + list(a_s) + list(b_s)


def run_grouped(inputs, scales, p, seeds, backend):
    x, ws, bs, a_s, b_s, grads = inputs
    x, bs, a_s, b_s = leaves(x, bs, a_s, b_s)
    ys = grouped_lora(x, ws, bs, a_s, b_s, scales, p, seeds, backend=backend)
    return [y.detach() for y in ys], list(torch.autograd.grad(ys, flat(x, bs, a_s, b_s), grads))


def run_separate(inputs, scales, p, seeds, backend, ref=False):
    x, ws, bs, a_s, b_s, grads = inputs
    if ref:  # the float64 oracle on the same (rounded) inputs
        x, ws, bs, a_s, b_s, grads = (t.detach().double().cpu() if isinstance(t, torch.Tensor)
                                      else [u.detach().double().cpu() if u is not None else None for u in t]
                                      for t in (x, ws, bs, a_s, b_s, grads))
    x, bs, a_s, b_s = leaves(x, bs, a_s, b_s)
    ys = []
    for w, b, a, bb, s, seed in zip(ws, bs, a_s, b_s, scales, seeds):
        if ref:
            ys.append(lora_linear_ref(x, w, a, bb, s, bias=b, dropout_p=p, seed=seed))
        else:
            ys.append(lora_linear(x, w, a, bb, s, bias=b, dropout_p=p, seed=seed, backend=backend))
    return [y.detach() for y in ys], list(torch.autograd.grad(ys, flat(x, bs, a_s, b_s), grads))


def assert_close(out, ref, tol, what):
    for i, (o, r) in enumerate(zip(out, ref)):
        assert not torch.isnan(o).any(), f"{what}[{i}] has NaN (an element never written?)"
        err = rel_error(o.cpu(), r.cpu())
        assert err <= tol, f"{what}[{i}]: relative error {err:.3g} > {tol:.3g}"


CASES = [  # (K, Ns, ranks, biases, lead dims)
    (40, (24, 8, 16), (3, 5, 7), (True, False, True), (37,)),  # K % 16 != 0, odd ranks, M % block != 0
    (64, (48, 20), (16, 5), (False, True), (3, 13)),  # 2 members, 3-D x
]


def _check_case(backend, dtype, p, case, nan_empty_used=True):
    k, ns, ranks, biases, lead = case
    inputs = make_group(k, ns, ranks, dtype, biases, device=KERNEL_DEVICE if backend != "torch" else "cpu",
                        lead=lead, seed=len(ns) + int(p * 10))
    scales = [2.0, 0.5, 1.25][:len(ns)]
    seeds = [11, 2**40 + 3, 2**62 + 5][:len(ns)]
    ys, grads = run_grouped(inputs, scales, p, seeds, backend)
    ys_sep, grads_sep = run_separate(inputs, scales, p, seeds, backend)
    ys_ref, grads_ref = run_separate(inputs, scales, p, seeds, backend, ref=True)
    tol = TOLERANCES[dtype]
    assert_close(ys, ys_ref, tol, "y vs float64")
    assert_close(grads, grads_ref, tol, "grad vs float64")
    # against the separate layers: the same maths, same masks; only rounding order may differ
    assert_close(ys, ys_sep, tol, "y vs separate lora_linear")
    assert_close(grads, grads_sep, tol, "grad vs separate lora_linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("case", CASES, ids=["3members", "2members"])
def test_torch_backend_equals_separate_layers(dtype, p, case, nan_empty):
    _check_case("torch", dtype, p, case)


@needs_triton
@pytest.mark.parametrize("backend,dtype,p,case", [
    ("triton", torch.float32, 0.0, CASES[0]),
    ("triton", torch.float32, 0.25, CASES[0]),
    ("hybrid", torch.bfloat16, 0.25, CASES[0]),
    ("fused", torch.float16, 0.0, CASES[1]),
    ("triton", torch.float16, 0.25, CASES[1]),
    ("hybrid", torch.bfloat16, 0.0, CASES[1]),
], ids=["tri-f32-p0-3", "tri-f32-p-3", "hyb-bf16-p-3", "fused-f16-p0-2", "tri-f16-p-2", "hyb-bf16-p0-2"])
def test_triton_backends_equal_separate_layers(backend, dtype, p, case, nan_empty):
    _check_case(backend, dtype, p, case)


@needs_triton
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_kernel_masks_are_the_single_layer_masks_bit_for_bit(p):
    """With A_i = identity (r_i = K) the grouped shrink returns x ⊙ Z_i itself: each member's mask
    equals the definition's with that member's seed, and the grouped dA (v = identity rows) too."""
    from lora_kernels.kernels.group_grad import lora_group_grad_bwd
    from lora_kernels.kernels.group_shrink import lora_group_shrink_fwd

    m, k = 45, 40
    x = torch.randn(m, k).to(KERNEL_DEVICE)
    eye = torch.eye(k, device=KERNEL_DEVICE)
    seeds = [7, 2**33 + 1, 123456789]
    u = lora_group_shrink_fwd(x, [eye, eye[:5], eye[:3]], seeds, p)
    expected = [x * dropout_mask(s, m, k, p, device=KERNEL_DEVICE) if p > 0 else x for s in seeds]
    assert torch.equal(u[:, :k], expected[0])
    assert torch.equal(u[:, k:k + 5], expected[1][:, :5])
    assert torch.equal(u[:, k + 5:], expected[2][:, :3])
    # dA_i = s_i·v_iᵀ·(x ⊙ Z_i) with v_i = the identity on its first K rows: dA_i = (x ⊙ Z_i)[:K]
    v = torch.zeros(m, 2 * k, device=KERNEL_DEVICE)
    v[:k, :k] = eye
    v[:k, k:] = eye
    grads = lora_group_grad_bwd(x, v, [eye, eye], [1.0, 1.0], seeds[:2], p, None)
    assert torch.equal(grads[0], expected[0][:k])
    assert torch.equal(grads[1], expected[1][:k])


def _count_runs(monkeypatch):
    from lora_kernels.kernels import group_grad, group_shrink, shrink

    counts = {"group_shrink": 0, "group_grad": 0, "shrink": 0}
    for key, kernel in (("group_shrink", group_shrink._lora_group_shrink_kernel),
                        ("group_grad", group_grad._lora_group_grad_kernel),
                        ("shrink", shrink._lora_shrink_kernel)):
        run = kernel.run

        def counted(*args, _run=run, _key=key, **kwargs):
            counts[_key] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return counts


@needs_triton
def test_one_grouped_shrink_launch_per_group_and_forward(monkeypatch):
    from lora_kernels.kernels.group_shrink import LAUNCHES

    counts = _count_runs(monkeypatch)
    inputs = make_group(32, (16, 8, 8), (4, 4, 4), torch.float32, (False,) * 3, device=KERNEL_DEVICE, lead=(20,))
    x, ws, bs, a_s, b_s, grads = inputs
    x, bs, a_s, b_s = leaves(x, bs, a_s, b_s)
    before = dict(LAUNCHES)
    ys = grouped_lora(x, ws, bs, a_s, b_s, [1.0] * 3, 0.1, [1, 2, 3], backend="triton")
    assert counts == {"group_shrink": 1, "group_grad": 0, "shrink": 0}  # no per-member shrink
    assert LAUNCHES["group_shrink"] == before["group_shrink"] + 1
    torch.autograd.backward(ys, grads)
    # backward: one v+dB launch per member (each reads its own g), one grouped dA/dx launch
    assert counts == {"group_shrink": 1, "group_grad": 1, "shrink": 3}
    assert LAUNCHES["group_grad"] == before["group_grad"] + 1


def test_seeds_none_and_tensors_follow_lora_linear():
    """seed=None draws one seed per member, in member order, as separate lora_linear calls do; a
    1-element seed tensor is read like an int."""
    inputs = make_group(24, (8, 12), (2, 3), torch.float32, (True, False), lead=(10,))
    scales = [1.0, 3.0]
    torch.manual_seed(5)
    ys, grads = run_grouped(inputs, scales, 0.4, [None, None], "torch")
    torch.manual_seed(5)
    ys_sep, grads_sep = run_separate(inputs, scales, 0.4, [None, None], "torch")
    for a, b in zip(ys + grads, ys_sep + grads_sep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ys_t, _ = run_grouped(inputs, scales, 0.4, [torch.tensor([9]), 17], "torch")
    ys_i, _ = run_separate(inputs, scales, 0.4, [9, 17], "torch")
    for a, b in zip(ys_t, ys_i):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dx_needs_only_the_members_that_got_a_gradient():
    """A member whose output is unused gets no gradient at all (None, as a separate layer would: an
    optimizer then skips it), and the used member's gradients equal a separate layer's."""
    x, ws, bs, a_s, b_s, _ = make_group(16, (8, 4), (2, 2), torch.float32, (False, False), lead=(6,))
    xl, _, al, bl = leaves(x, bs, a_s, b_s)
    ys = grouped_lora(xl, ws, bs, al, bl, [1.0, 1.0], 0.0, [0, 0], backend="torch")
    ys[0].sum().backward()
    xr, ar, br = (t.clone().requires_grad_(True) for t in (x, a_s[0], b_s[0]))
    lora_linear(xr, ws[0], ar, br, 1.0, backend="torch").sum().backward()
    assert al[1].grad is None and bl[1].grad is None
    for got, want in ((xl.grad, xr.grad), (al[0].grad, ar.grad), (bl[0].grad, br.grad)):
        torch.testing.assert_close(got, want)
    _, _, al2, bl2 = leaves(x, bs, a_s, b_s)
    ys = grouped_lora(x, ws, bs, al2, bl2, [1.0, 1.0], 0.2, [1, 2], backend="torch")
    sum(y.sum() for y in ys).backward()
    assert al2[0].grad is not None and bl2[1].grad is not None


def _compiled_equals_eager(backend, device, bias_members):
    """grouped_lora is a torch.library custom op pair: torch.compile (aot_eager, fullgraph) traces it
    as one node, and the compiled step equals the eager one, loss and every gradient."""
    inputs = make_group(32, (8, 12), (2, 3), torch.float32, bias_members, device=device, lead=(20,))
    x, ws, bs, a_s, b_s, grads = inputs

    def step(x, bs, a_s, b_s):
        ys = grouped_lora(x, ws, bs, a_s, b_s, [1.0, 2.0], 0.3, [3, 4], backend=backend)
        return sum((y * g).sum() for y, g in zip(ys, grads))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        xl, bl, al, bbl = leaves(x, bs, a_s, b_s)
        loss = fn(xl, bl, al, bbl)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, flat(xl, bl, al, bbl))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    _compiled_equals_eager("torch", "cpu", (True, False))


def _args(n=2, k=16, ranks=(2, 3), dtype=torch.float32):
    x, ws, bs, a_s, b_s, _ = make_group(k, (8, 4, 6, 5, 3)[:n], (ranks * 3)[:n], dtype, (False,) * n, lead=(5,))
    return dict(x=x, weights=ws, biases=bs, lora_as=a_s, lora_bs=b_s, scales=[1.0] * n, dropout_p=0.0,
                seeds=list(range(n)))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(x=a["x"][:, :15]), ValueError, r"member 0: x's last dimension \(15\)"),
    (lambda a: a["lora_as"].__setitem__(1, a["lora_as"][1][:, :8]), ValueError, r"^lora_as\[1\] must have shape \(r, 16\) to match weights\[1\]"),
    (lambda a: a.update(seeds=[1]), ValueError, r"len\(weights\) = 2 .*seeds: 1"),
    (lambda a: a.update(biases=[None]), ValueError, r"biases: 1"),
    (lambda a: a.update(scales=(1.0,)), ValueError, r"scales: 1"),
    (lambda a: a.update(weights=[]), ValueError, r"weights is empty"),
    (lambda a: a.update(lora_as="A"), TypeError, r"lora_as must be a list"),
    (lambda a: a["weights"][0].requires_grad_(True), ValueError, r"weights\[0\] requires grad"),
    (lambda a: a["lora_as"].__setitem__(0, a["lora_as"][0][:0]), ValueError, r"member 0: rank must be >= 1"),
    (lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: a.update(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: a.update(scales=[1.0, float("nan")]), ValueError, r"^scales\[1\] must be finite"),
    (lambda a: a.update(seeds=[0, -1], dropout_p=0.1), ValueError, r"^seeds\[1\] must be in"),
    (lambda a: a["weights"].__setitem__(1, a["weights"][1].double()), TypeError, r"^weights\[1\] dtype"),
    (lambda a: a["biases"].__setitem__(1, torch.zeros(3)), ValueError, r"^biases\[1\] must have shape \(4,\)"),
    (lambda a: a.update(seeds=[0, torch.tensor([1.5])], dropout_p=0.1), TypeError, r"^seeds\[1\] must be an int"),
], ids=["K", "A-shape", "seeds-len", "biases-len", "scales-len", "empty", "not-list", "weight-grad", "rank0",
        "p=1", "p<0", "scale-nan", "seed-neg", "weight-dtype", "bias-shape", "seed-tensor"])
def test_bad_inputs_are_refused_with_clear_errors(change, error, match):
    args = _args()
    change(args)
    with pytest.raises(error, match=match):
        grouped_lora(**args, backend="torch")


def test_seeds_none_draw_nothing_before_every_member_is_validated():
    """seeds=None draws in member order, but only once every member passed its checks: a bad later
    member leaves torch's generator untouched."""
    args = _args()
    args.update(seeds=[None, -1], dropout_p=0.1)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"^seeds\[1\]"):
        grouped_lora(**args, backend="torch")
    assert torch.equal(torch.get_rng_state(), state)
    args = _args()
    args.update(seeds=[None, None], dropout_p=0.1, scales=[1.0, float("inf")])
    with pytest.raises(ValueError, match=r"^scales\[1\]"):
        grouped_lora(**args, backend="torch")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("n, ranks, why", [(5, (2, 3), "5 members"), (2, (2, 300), "rank 300 > 256")])
def test_auto_moving_a_whole_group_to_torch_warns_once(monkeypatch, n, ranks, why):
    """Under 'auto' on CUDA, more than 4 members or a member of rank > 256 put the whole group on the
    torch backend: said once with a RuntimeWarning (CUDA routing stood in for by the resolver)."""
    from lora_kernels import backends, grouped

    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(grouped, "resolve_backend", lambda backend, x, n_out, r: "torch" if backend == "torch" or r > 256 else "fused")
    args = _args(n=n, ranks=ranks)
    with pytest.warns(RuntimeWarning, match=f"projection group with (a member of )?{why}.*wholly on the .*torch backend"):
        ys = grouped_lora(**args, backend="auto")
    for y, ref in zip(ys, grouped_lora(**args, backend="torch")):
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped_lora(**args, backend="auto")  # once


@needs_triton
def test_explicit_triton_refuses_what_it_cannot_run():
    args = _args(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports dtypes"):
        grouped_lora(**args, backend="triton")
    args = _args(n=2, k=16, ranks=(2, 300))
    with pytest.raises(ValueError, match="supports ranks up to 256"):
        grouped_lora(**args, backend="hybrid")
    args = _args(n=5)
    if KERNEL_DEVICE == "cpu":
        with pytest.raises(ValueError, match="at most 4 members"):
            grouped_lora(**args, backend="triton")
    ys = grouped_lora(**_args(n=5), backend="torch")  # the torch backend takes any member count
    assert len(ys) == 5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_saved_for_backward_is_x_once_u_and_seeds_never_a_mask(backend):
    """Saved: x once, u (M × Σr), the seeds, the frozen weights and adapters; nothing else M×K."""
    m, k = 33, 48
    x, ws, bs, a_s, b_s, _ = make_group(k, (20, 12, 12), (3, 5, 7), torch.float32, (True, False, False),
                                        device=KERNEL_DEVICE if backend != "torch" else "cpu", lead=(m,))
    xl, bl, al, bbl = leaves(x, bs, a_s, b_s)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grouped_lora(xl, ws, bl, al, bbl, [1.0, 1.0, 1.0], 0.2, [5, 6, 7], backend=backend)
    big = [t for t in saved if t.numel() >= m * k]
    assert len(big) == 1 and big[0].shape == (m, k) and big[0].data_ptr() == xl.data_ptr()  # x itself, once
    assert any(t.shape == (m, 15) for t in saved)  # u of all members side by side
    assert not any(t.dtype == torch.bool for t in saved)


@needs_triton
def test_torch_compile_with_the_kernel_path():
    _compiled_equals_eager("triton", KERNEL_DEVICE, (False, True))


def test_modeled_saving_of_llama3_8b_groups():
    """lora_kernels.perf.groups_model: grouping reads x twice instead of 2n times, drops the autograd
    dx adds and saves bytes and (modeled) time; every figure is labelled modeled."""
    from lora_kernels.perf.groups_model import grouped, markdown, modeled_saving, ungrouped

    rows = modeled_saving()
    assert {(r["group"], r["p"]) for r in rows} == {(g, p) for g in ("q/k/v", "gate/up") for p in (0.0, 0.1)}
    for r in rows:
        n = len(r["N"])
        assert r["modeled"] and r["x_reads"] == (2 * n, 2)
        assert r["grouped_launches"] == r["ungrouped_launches"] - 2 * (n - 1) - (n - 1)
        # at least the x re-reads (n − 1 in each direction) and one M×K add per extra member
        m_k_bytes = r["M"] * r["K"] * 2
        assert r["saved_bytes"] >= (2 * (n - 1) + 3 * (n - 1)) * m_k_bytes * 0.99
        assert 0 < r["ratio"] < 1
    assert "| q/k/v (4096 → 4096/1024/1024) | 0.1 | 6 → 2 |" in markdown(rows)
    a, b = ungrouped(128, 64, (32, 16), 4, 0.0), grouped(128, 64, (32, 16), 4, 0.0)
    assert b.bytes < a.bytes and len(b.launches) == len(a.launches) - 3


@needs_triton
def test_kernel_path_with_transposed_x_and_no_rows(nan_empty):
    """x with K-major storage (strides (1, M)) and an empty batch both go through the kernels."""
    inputs = make_group(40, (24, 8), (3, 5), torch.float32, (True, False), device=KERNEL_DEVICE, lead=(29,))
    x = inputs[0]
    xt = x.t().contiguous().t()
    assert xt.stride() == (1, 29)
    ys, grads = run_grouped((xt,) + inputs[1:], [1.0, 2.0], 0.2, [4, 5], "triton")
    ys_ref, grads_ref = run_separate(inputs, [1.0, 2.0], 0.2, [4, 5], "triton", ref=True)
    assert_close(ys, ys_ref, TOLERANCES[torch.float32], "y")
    assert_close(grads, grads_ref, TOLERANCES[torch.float32], "grad")
    empty = make_group(40, (24, 8), (3, 5), torch.float32, (True, False), device=KERNEL_DEVICE, lead=(0,))
    ys, grads = run_grouped(empty, [1.0, 2.0], 0.2, [4, 5], "triton")
    assert [tuple(y.shape) for y in ys] == [(0, 24), (0, 8)]
    assert all(not torch.isnan(g).any() and (g.numel() == 0 or g.abs().sum() == 0) for g in grads)


@pytest.mark.parametrize("impl", ["torch", pytest.param("fused,hybrid", marks=needs_triton)])
def test_custom_op_passes_opcheck(impl):
    dev = "cpu" if impl == "torch" else KERNEL_DEVICE
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    x = rnd(20, 32).requires_grad_(True)
    ws = [rnd(8, 32), rnd(4, 32)]
    bs = [rnd(8).requires_grad_(True)]
    a_s = [rnd(2, 32).requires_grad_(True), rnd(3, 32).requires_grad_(True)]
    b_s = [rnd(8, 2).requires_grad_(True), rnd(4, 3).requires_grad_(True)]
    result = torch.library.opcheck(torch.ops.lora_kernels.grouped_lora_fwd.default,
                                   (x, ws, bs, 0b01, a_s, b_s, [1.0, 2.0], 0.2, [3, 4], impl, None))
    assert set(result.values()) == {"SUCCESS"}, result


@needs_triton
def test_default_configs_compile_for_sm90a_without_spills():
    """Compile only (no GPU; a clean process without the interpreter): the q/k/v group's grouped
    kernels at r = 16, bf16, p in {0, 0.1} use wgmma, do not spill, and the mask costs at most 12
    SASS instructions per element per member in the shrink loop."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from lora_kernels.perf.groups_model import compile_review; "
            "print(json.dumps(compile_review(members=(3,), ranks=(16,), dropouts=(0.0, 0.1), dtypes=('bfloat16',))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    assert all(r["spill_bytes"] == 0 and r["stl"] == 0 and r["mma"] == "wgmma" for r in rows), rows
    shrink = {r["p"]: r for r in rows if "shrink" in r["kernel"]}
    extra = (shrink[0.1]["sass_per_element"] - shrink[0.0]["sass_per_element"]) / 3
    assert 0 < extra <= 12, extra

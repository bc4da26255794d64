"""Several adapters at once (lora_kernels.multi): mixed-adapter batches and several active adapters,
on the torch backend and on the Triton kernels (interpreter on CPU), against the float64 oracles,
per-row single-adapter calls, and PEFT itself."""
import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.functional import dora_linear, lora_linear
from lora_kernels.multi import AdapterSpec, multi_adapter_linear, set_active_adapters
from lora_kernels.multi import functional as multi_functional
from lora_kernels.multi import store as multi_store
from lora_kernels.multi.glue import adapter_names_context
from lora_kernels.multi.plan import mixed_batch_plan
from lora_kernels.multi.reference import active_adapters_ref, mixed_batch_ref
from lora_kernels.testing import TOLERANCES, rel_error

from .models import SeededDropout, randomize_adapters, tiny_llama, tokens


def _specs(n_out, k, ranks, dora=(), dropout=0.0, dtype=torch.float32, seed=0):
    """Random adapters (B nonzero) with differing ranks and scales; indices in ``dora`` are DoRA."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i, r in enumerate(ranks):
        a = (torch.randn(r, k, generator=g, dtype=torch.float64) * k ** -0.5).to(dtype)
        b = (torch.randn(n_out, r, generator=g, dtype=torch.float64) * r ** -0.5).to(dtype)
        mag = (torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5).to(dtype) if i in dora else None
        specs.append(AdapterSpec(f"a{i}", a, (lambda b=b: b), 0.5 + 0.25 * i, dropout, mag,
                                 tuple(t for t in (a, b, mag) if t is not None)))
    return specs


def _as64(specs):
    return [AdapterSpec(s.name, s.lora_a.double(), (lambda s=s: s.lora_b().double()), s.scale, s.dropout,
                        None if s.magnitude is None else s.magnitude.double(), ()) for s in specs]


def _inputs(lead, k, n_out, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(n_out, k, generator=g, dtype=torch.float64) * k ** -0.5).to(dtype)
    b = torch.randn(n_out, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


BACKENDS = ["torch", "triton"]
# The kernels run on CUDA where there is a GPU, else on CPU tensors in the interpreter (conftest).
KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(backend):
    return KERNEL_DEV if backend == "triton" else "cpu"


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def _specs_on(specs, device):
    out = []
    for s in specs:
        a, b, m = _to(device, s.lora_a, s.lora_b(), s.magnitude)
        out.append(AdapterSpec(s.name, a, (lambda b=b: b), s.scale, s.dropout, m, tuple(t for t in (a, b, m) if t is not None)))
    return out


# ------------------------------------------------------------------------------------------------
# functional: mixed batches and several active adapters against the float64 oracles


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dora", [(), (1,)], ids=["lora", "lora+dora"])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_matches_oracle(backend, dora, bias):
    x, w, b = _to(_dev(backend), *_inputs((3, 13), 40, 72, torch.float32))  # N, K not multiples of the blocks
    b = b if bias else None
    specs = _specs_on(_specs(72, 40, [1, 8, 12, 16], dora=dora), _dev(backend))
    idx = torch.randint(-1, 4, (39,), generator=torch.Generator().manual_seed(2))
    idx[:3] = torch.tensor([-1, 0, 3])
    idx = idx.to(_dev(backend))
    y = multi_adapter_linear(x, w, b, specs, row_adapter=idx, backend=backend)
    ref = mixed_batch_ref(x.double(), w.double(), None if b is None else b.double(), _as64(specs), idx)
    assert y.shape == (3, 13, 72)
    assert rel_error(y, ref) < TOLERANCES[torch.float32]
    base = (x.reshape(-1, 40) @ w.t() + (b if bias else 0)).reshape(3, 13, 72)
    rows = (idx == -1).reshape(3, 13)
    torch.testing.assert_close(y[rows], base[rows])  # rows without an adapter are the base layer's


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_batch_half_precision_kernel(dtype):
    x, w, b = _to(KERNEL_DEV, *_inputs((33,), 32, 48, dtype))
    specs = _specs_on(_specs(48, 32, [4, 16, 2], dora=(2,), dtype=dtype), KERNEL_DEV)
    idx = (torch.arange(33) % 4 - 1).to(KERNEL_DEV)
    y = multi_adapter_linear(x, w, b, specs, row_adapter=idx, backend="triton")
    assert y.dtype == dtype
    ref = mixed_batch_ref(x.double(), w.double(), b.double(), _as64(specs), idx)
    assert rel_error(y, ref) < TOLERANCES[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dora", [(), (0, 2)], ids=["lora", "dora-first-and-last"])
def test_several_active_match_oracle(backend, dora):
    x, w, b = _to(_dev(backend), *_inputs((37,), 48, 40, torch.float32))
    specs = _specs_on(_specs(40, 48, [8, 4, 12], dora=dora), _dev(backend))
    order = [2, 0, 1]
    y = multi_adapter_linear(x, w, b, specs, active=order, backend=backend)
    ref = active_adapters_ref(x.double(), w.double(), b.double(), _as64(specs), order)
    assert rel_error(y, ref) < TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_dropout_masks_equal_single_adapter_calls(backend):
    """In training, row m of adapter i uses row m of the mask a single-adapter call with seed i draws
    on the whole batch (and the kernel's in-register mask equals the torch twin's)."""
    x, w, b = _to(_dev(backend), *_inputs((45,), 40, 24, torch.float32))
    specs = _specs_on(_specs(24, 40, [4, 8, 6], dropout=0.3), _dev(backend))
    seeds = [11, 12, 13]
    idx = (torch.arange(45) % 4 - 1).to(_dev(backend))
    with torch.no_grad():
        y = multi_adapter_linear(x, w, b, specs, row_adapter=idx, training=True, seeds=seeds, backend=backend)
        for i, s in enumerate(specs):
            one = lora_linear(x, w, s.lora_a, s.lora_b(), s.scale, bias=b, dropout_p=0.3, seed=seeds[i],
                              backend="torch")
            rows = idx == i
            torch.testing.assert_close(y[rows], one[rows], rtol=1e-5, atol=1e-5)
        ref = mixed_batch_ref(x.double(), w.double(), b.double(), _as64(specs), idx, training=True, seeds=seeds)
    assert rel_error(y, ref) < TOLERANCES[torch.float32]
    assert rel_error(y, mixed_batch_ref(x.double(), w.double(), b.double(), _as64(specs), idx)) > 1e-3  # dropout acted


def test_kernel_masks_equal_dropout_mask_bit_for_bit():
    """Each multi kernel regenerates adapter a's mask from its own seed (two int32 words per adapter) and
    threshold: with x = 1 and identity / one-hot operands, the shrink's u, the expand's added term and
    dA are Z_a at the gathered rows, equal to ``dropout_mask`` bit for bit. K = 150: several K tiles
    and a partly used last 16-group; seeds with the low word's sign bit set and the largest seed;
    an adapter with p = 0 keeps everything. A NaN in a dropped position still propagates (a product)."""
    from lora_kernels.dropout import dropout_mask, dropout_threshold, keep_scale, seed_halves
    from lora_kernels.kernels.multi_expand import lora_multi_expand_fwd
    from lora_kernels.kernels.multi_grad import lora_multi_a_grad
    from lora_kernels.kernels.multi_shrink import lora_multi_shrink_fwd, multi_block_m
    from lora_kernels.multi.plan import active_adapters_plan

    dev, m, k = KERNEL_DEV, 21, 150
    ps, seeds = [0.1, 0.5, 0.0], [2**63 - 1, 2**32 + 2**31 + 7, 5]
    n = len(ps)
    words = torch.tensor([seed_halves(s) for s in seeds], dtype=torch.int32, device=dev)
    thr = torch.tensor([dropout_threshold(p) for p in ps], dtype=torch.int32, device=dev)
    ks = torch.tensor([keep_scale(p) for p in ps], dtype=torch.float32, device=dev)
    z = [dropout_mask(s, m, k, p, device=dev) for s, p in zip(seeds, ps)]
    assert not torch.equal(z[0], z[1]) and bool((z[1] == 0).any()) and bool((z[2] == 1).all())
    row_adapter = (torch.arange(m) * 7 % (n + 1) - 1).to(dev)  # every adapter and some base rows
    plan = mixed_batch_plan(row_adapter, n, multi_block_m())
    x = torch.ones(m, k, device=dev)
    eye = torch.eye(k, device=dev).expand(n, k, k).contiguous()  # A_a = I: u = x ⊙ Z_a
    ranks = torch.full((n,), k, dtype=torch.int32, device=dev)
    u = lora_multi_shrink_fwd(x, eye, plan, ranks, words, thr, ks, has_dropout=True)
    groups = [(int(plan.group_start[a]), int(plan.group_end[a])) for a in range(n)]
    for a, (lo, hi) in enumerate(groups):
        assert hi > lo
        assert torch.equal(u[0, lo:hi], z[a][plan.rows[lo:hi]]), f"shrink, adapter {a}"
    active = active_adapters_plan(m, [2, 0, 1], multi_block_m(), dev)
    u_act = lora_multi_shrink_fwd(x, eye, active, ranks, words, thr, ks, has_dropout=True)
    for slot, a in enumerate([2, 0, 1]):
        assert torch.equal(u_act[slot], z[a]), f"shrink, active slot {slot}"
    # expand: rank 1, u = B = 1, s = 1: y gains exactly Z_a at its rows, base rows stay 0
    y = torch.zeros(m, k, device=dev)
    ones = dict(ranks=torch.ones(n, dtype=torch.int32, device=dev), scales=torch.ones(n, device=dev))
    lora_multi_expand_fwd(y, torch.ones(1, m, 1, device=dev), torch.ones(n, k, 1, device=dev), plan, ones["ranks"],
                          ones["scales"], seed_words=words, threshold=thr, keep_scale=ks)
    for a in range(n):
        rows = row_adapter == a
        assert torch.equal(y[rows], z[a][rows]), f"expand, adapter {a}"
    assert bool((y[row_adapter < 0] == 0).all())
    # dA: v one-hot by position (rank m), s = 1: dA[a][pos] = (x ⊙ Z_a)[rows[pos]]
    v = torch.eye(m, device=dev)[None]
    da = lora_multi_a_grad(v, x, plan, n, m, ones["scales"], seed_words=words, threshold=thr, keep_scale=ks)
    for a, (lo, hi) in enumerate(groups):
        assert torch.equal(da[a, lo:hi], z[a][plan.rows[lo:hi]]), f"dA, adapter {a}"
        assert bool((da[a, :lo] == 0).all()) and bool((da[a, hi:] == 0).all())
    # NaN in a dropped position of x propagates through the shrink (x ⊙ keep, a product)
    lo, _ = groups[1]
    row = int(plan.rows[lo])
    col = int((z[1][row] == 0).nonzero()[0])
    x[row, col] = float("nan")
    u = lora_multi_shrink_fwd(x, eye, plan, ranks, words, thr, ks, has_dropout=True)
    assert bool(torch.isnan(u[0, lo, col]))


def test_multi_kernel_dropout_arguments_are_checked():
    from lora_kernels.kernels.multi_shrink import lora_multi_shrink_fwd, multi_block_m

    x = torch.ones(4, 16, device=KERNEL_DEV)
    a = torch.ones(2, 2, 16, device=KERNEL_DEV)
    plan = mixed_batch_plan(torch.tensor([0, 1, 0, 1], device=KERNEL_DEV), 2, multi_block_m())
    ranks = torch.full((2,), 2, dtype=torch.int32, device=KERNEL_DEV)
    thr = torch.zeros(2, dtype=torch.int32, device=KERNEL_DEV)
    ks = torch.ones(2, device=KERNEL_DEV)
    with pytest.raises(ValueError, match="seed_words must be a contiguous torch.int32 tensor of shape \\(2, 2\\)"):
        lora_multi_shrink_fwd(x, a, plan, ranks, torch.zeros(2, dtype=torch.int64, device=KERNEL_DEV), thr, ks, True)
    specs = _specs(8, 8, [2], dropout=1.0)
    with pytest.raises(ValueError, match="adapter 'a0': dropout must be in \\[0, 1\\)"):
        multi_store.build_stack(specs, torch.ones(8, 8), torch.float32)


def test_several_active_with_dropout_match_oracle_on_torch_path():
    x, w, b = _inputs((30,), 24, 16, torch.float32)
    specs = _specs(16, 24, [4, 2], dora=(1,), dropout=0.2)
    seeds = [5, 6]
    y = multi_adapter_linear(x, w, b, specs, active=[0, 1], training=True, seeds=seeds, backend="torch")
    ref = active_adapters_ref(x.double(), w.double(), b.double(), _as64(specs), [0, 1], training=True, seeds=seeds)
    assert rel_error(y, ref) < TOLERANCES[torch.float32]


def test_mixed_batch_gradients_match_oracle_and_are_deterministic():
    x, w, b = _inputs((20,), 16, 12, torch.float32)
    specs = _specs(12, 16, [4, 3], dora=(1,), dropout=0.25)
    bs = [s.lora_b() for s in specs]
    for s, bb in zip(specs, bs):
        s.lora_a.requires_grad_(True)
        bb.requires_grad_(True)
        if s.magnitude is not None:
            s.magnitude.requires_grad_(True)
    x.requires_grad_(True)
    idx = torch.arange(20) % 3 - 1
    g = torch.randn(20, 12, generator=torch.Generator().manual_seed(9))
    params = [x] + [t for s in specs for t in (s.lora_a, s.lora_b(), s.magnitude) if t is not None]

    def grads(fn):
        out = fn()
        return torch.autograd.grad((out * g.to(out.dtype)).sum(), params)

    ours = grads(lambda: multi_adapter_linear(x, w, b, specs, row_adapter=idx, training=True, seeds=[3, 4]))
    again = grads(lambda: multi_adapter_linear(x, w, b, specs, row_adapter=idx, training=True, seeds=[3, 4]))
    for a, c in zip(ours, again):
        assert torch.equal(a, c)  # deterministic
    # float64 oracle built from the same leaf tensors (cast inside the graph)
    specs64 = [AdapterSpec(s.name, s.lora_a.double(), (lambda s=s: s.lora_b().double()), s.scale, s.dropout,
                           None if s.magnitude is None else s.magnitude.double(), ()) for s in specs]
    ref = grads(lambda: mixed_batch_ref(x.double(), w.double(), b.double(), specs64, idx, training=True,
                                        seeds=[3, 4]))
    for a, r in zip(ours, ref):
        assert rel_error(a, r) < TOLERANCES[torch.float32]


@pytest.mark.parametrize("mode", ["rows", "active"])
def test_kernel_path_gradients_match_oracle_and_are_deterministic(mode):
    """Training on the kernels (LoRA adapters): v = g·B and dx reuse the shrink/expand kernels, dA and
    dB come from one launch each; all equal the float64 oracle's autograd, run to run bit for bit."""
    x, w, b = _to(KERNEL_DEV, *_inputs((41,), 40, 24, torch.float32))
    specs = _specs_on(_specs(24, 40, [3, 8, 5], dropout=0.2), KERNEL_DEV)
    bs = [s.lora_b() for s in specs]
    leaves = [x, b] + [s.lora_a for s in specs] + bs
    for t in leaves:
        t.requires_grad_(True)
    kw = dict(row_adapter=(torch.arange(41) % 4 - 1).to(KERNEL_DEV)) if mode == "rows" else dict(active=[2, 0, 1])
    g = torch.randn(41, 24, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEV)
    ref_fn = mixed_batch_ref if mode == "rows" else active_adapters_ref

    def run(fn):
        y = fn()
        return [y.detach()] + list(torch.autograd.grad((y * g.to(y.dtype)).sum(), leaves))

    ours = run(lambda: multi_adapter_linear(x, w, b, specs, training=True, seeds=[7, 8, 9], backend="triton", **kw))
    again = run(lambda: multi_adapter_linear(x, w, b, specs, training=True, seeds=[7, 8, 9], backend="triton", **kw))
    specs64 = [AdapterSpec(s.name, s.lora_a.double(), (lambda bb=bb: bb.double()), s.scale, s.dropout, None, ())
               for s, bb in zip(specs, bs)]
    key = "row_adapter" if mode == "rows" else "active"
    ref = run(lambda: ref_fn(x.double(), w.double(), b.double(), specs64, kw[key], training=True, seeds=[7, 8, 9]))
    for name, o, a, r in zip(["y", "dx", "db", "dA0", "dA1", "dA2", "dB0", "dB1", "dB2"], ours, again, ref):
        assert torch.equal(o, a), name
        assert rel_error(o, r) < TOLERANCES[torch.float32], name


def test_bias_gradient_alone_is_kept_on_the_kernel_path():
    x, w, b = _to(KERNEL_DEV, *_inputs((9,), 16, 8, torch.float32))
    specs = _specs_on(_specs(8, 16, [2]), KERNEL_DEV)
    b.requires_grad_(True)
    y = multi_adapter_linear(x, w, b, specs, row_adapter=torch.zeros(9, dtype=torch.int64, device=KERNEL_DEV),
                             backend="triton")
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full_like(b, 9.0))


def test_plan_groups_rows_without_host_sync_and_covers_every_row_once():
    idx = torch.tensor([2, -1, 0, 2, 2, 1, -1, 0, 2, 2, 2, 2, 2])
    plan = mixed_batch_plan(idx, 4, block_m=2)
    seen = []
    for g, start in zip(plan.blk_group.tolist(), plan.blk_start.tolist()):
        if g < 0:
            continue
        end = int(plan.group_end[g])
        rows = plan.rows[start:min(start + 2, end)].tolist()
        assert all(int(idx[r]) == g for r in rows)  # a block never straddles two adapters
        seen += rows
    assert sorted(seen) == [i for i in range(13) if idx[i] >= 0]
    assert plan.blk_group.shape[0] == -(-13 // 2) + 4  # the bound, known on the host


# ------------------------------------------------------------------------------------------------
# layers and models


def _layer_with_adapters(backend, dora_second=True, n_in=24, n_out=40):
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(n_in, n_out).to(_dev(backend)), rank=4, alpha=8, backend=backend,
                          adapter_name="a")
    layer.add_adapter("b", rank=8, alpha=4, use_dora=dora_second)
    layer.add_adapter("c", rank=2, alpha=2, use_rslora=True)
    with torch.no_grad():
        for a in layer.adapters.values():
            a.lora_B.normal_(0, 0.3)
            if a.lora_magnitude is not None:
                a.lora_magnitude.mul_(1.3)
    return layer.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_equals_per_row_loop_of_single_adapter_calls(backend):
    layer = _layer_with_adapters(backend)
    model = nn.Sequential(layer)
    names = ["a", "__base__", "b", "c", "b", "a", "__base__", "c", "b"]
    x = torch.randn(len(names), 3, 24, device=_dev(backend))
    with torch.no_grad(), adapter_names_context(model, names):
        y = layer(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == "__base__":
                expected = layer.base_layer(x[i:i + 1])
            else:
                layer.set_adapter(name)
                expected = layer(x[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], expected, rtol=1e-5, atol=1e-5)


def test_stack_is_cached_and_follows_in_place_updates():
    layer = _layer_with_adapters("triton")
    model = nn.Sequential(layer)
    names = ["a", "b", "c", "__base__"]
    x = torch.randn(4, 24, device=KERNEL_DEV)
    with torch.no_grad(), adapter_names_context(model, names):
        layer(x)
        count = multi_store.restack_count
        layer(x)
        assert multi_store.restack_count == count  # nothing re-stacked between calls
        layer.adapters["c"].lora_B.add_(0.5)  # an optimizer step / load writes in place
        y = layer(x)
        assert multi_store.restack_count == count + 1
    layer.set_adapter("c")
    with torch.no_grad():
        torch.testing.assert_close(y[2:3], layer(x[2:3]), rtol=1e-5, atol=1e-5)
    layer.add_adapter("d", rank=16, alpha=3)  # adding (or deleting) an adapter restacks once
    with torch.no_grad():
        layer.adapters["d"].lora_B.normal_()
    with torch.no_grad(), adapter_names_context(model, ["d", "a", "b", "c"]):
        y = layer(x)
    assert multi_store.restack_count == count + 2
    layer.set_adapter("d")
    with torch.no_grad():
        torch.testing.assert_close(y[0:1], layer(x[0:1]), rtol=1e-5, atol=1e-5)
    layer.set_adapter("a")
    layer.delete_adapter("d")
    with torch.no_grad(), adapter_names_context(model, ["c", "a", "b", "c"]):
        layer(x)
    assert multi_store.restack_count == count + 3


def _count_launches(monkeypatch):
    from lora_kernels.kernels import multi_expand, multi_shrink

    counts = {"shrink": 0, "expand": 0}
    for key, kernel in (("shrink", multi_shrink._lora_multi_shrink_kernel),
                        ("expand", multi_expand._lora_multi_expand_kernel)):
        run = kernel.run

        def counted(*args, _run=run, _key=key, **kwargs):
            counts[_key] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return counts


def test_sixteen_adapters_over_64_rows_is_one_shrink_and_one_expand_launch_per_layer(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).to(KERNEL_DEV)
    for i in range(16):
        lk.inject(model, lk.LoraConfig(rank=[2, 4, 8, 16][i % 4], alpha=8, target_modules=["0", "2"]),
                  adapter_name=f"t{i}", backend="triton")
    randomize_adapters(model)
    model.eval()
    g = torch.Generator().manual_seed(4)
    names = [f"t{int(i)}" for i in torch.randint(0, 16, (64,), generator=g)]
    names[5] = "__base__"
    x = torch.randn(64, 32, device=KERNEL_DEV)
    counts = _count_launches(monkeypatch)
    with torch.no_grad():
        y = model(x, adapter_names=names)
    assert counts == {"shrink": 2, "expand": 2}  # two adapted layers
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with lk.adapters_disabled(model):
                    rows.append(model(x[i:i + 1]))
            else:
                lk.set_adapter(model, name)
                for layer in lk.model.lora_layers(model).values():
                    layer.backend = "torch"
                rows.append(model(x[i:i + 1]))
    torch.testing.assert_close(y, torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_model_forward_and_generate_with_adapter_names_on_tiny_llama():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
              adapter_name="x")
    lk.inject(model, lk.LoraConfig(rank=8, alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"]),
              adapter_name="y")
    randomize_adapters(model)
    ids = tokens(batch=3, seq=6)
    names = ["y", "__base__", "x"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        out = model.generate(ids, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected_logits, expected_tokens = [], []
    for i, name in enumerate(names):
        with torch.no_grad(), (lk.adapters_disabled(model) if name == "__base__" else _active(model, name)):
            expected_logits.append(model(input_ids=ids[i:i + 1]).logits)
            expected_tokens.append(model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0))
    torch.testing.assert_close(mixed, torch.cat(expected_logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, torch.cat(expected_tokens))
    # the per-row state is gone after the call: plain forwards use the active adapter again
    lk.set_adapter(model, "x")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[2:], expected_logits[2])


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        lk.set_adapter(self.model, self.name)

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------
# several active adapters against PEFT (outputs and gradients)

peft = pytest.importorskip("peft")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.lin1 = nn.Linear(20, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _peft_and_ours(dropout):
    torch.manual_seed(0)
    base = _Tiny()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False, lora_dropout=dropout),
        adapter_name="first")
    peft_model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["lin0", "lin1"],
                                                     init_lora_weights=False, use_dora=True, lora_dropout=dropout))
    peft_model.add_adapter("third", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["lin1"],
                                                    init_lora_weights=False, lora_dropout=dropout))
    peft_model.base_model.set_adapter(["first", "second", "third"])
    ours = copy.deepcopy(base)
    for name, cfg in [("first", dict(rank=4, alpha=8, target_modules=["lin0", "lin1"])),
                      ("second", dict(rank=2, alpha=6, use_dora=True, target_modules=["lin0", "lin1"])),
                      ("third", dict(rank=6, alpha=3, target_modules=["lin1"]))]:
        lk.inject(ours, lk.LoraConfig(dropout=dropout, **cfg), adapter_name=name)
    with torch.no_grad():
        for mod in ("lin0", "lin1"):
            theirs = peft_model.base_model.model.get_submodule(mod)
            mine = ours.get_submodule(mod)
            for name, a in mine.adapters.items():
                a.lora_A.copy_(theirs.lora_A[name].weight)
                a.lora_B.copy_(theirs.lora_B[name].weight)
                if a.use_dora:
                    a.lora_magnitude.copy_(theirs.lora_magnitude_vector[name].weight)
                if dropout:
                    theirs.lora_dropout[name] = SeededDropout(dropout)
    lk.set_adapter(ours, ["first", "second", "third"])
    return peft_model, ours


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("train", [False, True])
def test_several_active_adapters_match_peft_outputs_and_gradients(dropout, train):
    peft_model, ours = _peft_and_ours(dropout)
    peft_model.train(train)
    ours.train(train)
    x = torch.randn(2, 5, 12)
    torch.manual_seed(7)
    y_peft = peft_model(x)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    if not train:
        return
    g = torch.randn_like(y_peft)
    (y_peft * g).sum().backward()
    (y_ours * g).sum().backward()
    for mod in ("lin0", "lin1"):
        theirs = peft_model.base_model.model.get_submodule(mod)
        mine = ours.get_submodule(mod)
        for name, a in mine.adapters.items():
            torch.testing.assert_close(a.lora_A.grad, theirs.lora_A[name].weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.lora_B.grad, theirs.lora_B[name].weight.grad, rtol=1e-4, atol=1e-6)
            if a.use_dora:
                torch.testing.assert_close(a.lora_magnitude.grad, theirs.lora_magnitude_vector[name].weight.grad,
                                           rtol=1e-4, atol=1e-6)


def test_mixed_batch_matches_peft_adapter_names():
    peft_model, ours = _peft_and_ours(0.0)
    peft_model.eval()
    ours.eval()
    peft_model.base_model.set_adapter("first")
    names = ["third", "__base__", "first", "third", "first"]  # PEFT refuses DoRA adapters in adapter_names
    x = torch.randn(5, 3, 12)
    with torch.no_grad():
        expected = peft_model(x, adapter_names=names)
        got = ours(x, adapter_names=names)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_adapter_names_are_refused_naming_the_argument():
    layer = _layer_with_adapters("torch")
    model = nn.Sequential(layer)
    lk.multi.enable_adapter_names(model)
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="adapter_names has unknown adapter"):
        model(x, adapter_names=["a", "nope", "b"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries"):
        model(x, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(x, adapter_names="a")
    assert layer.__dict__.get("_lk_multi_rows") is None  # nothing left behind by a refused call
    torch.testing.assert_close(model(x), layer(x))


def test_bad_functional_input_is_refused():
    x, w, b = _inputs((6,), 8, 8, torch.float32)
    specs = _specs(8, 8, [2, 2], dora=(1,), dropout=0.1)
    with pytest.raises(ValueError, match="row_adapter must have one entry per row"):
        multi_adapter_linear(x, w, b, specs, row_adapter=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="row_adapter entries must be -1"):
        multi_adapter_linear(x, w, b, specs, row_adapter=torch.full((6,), 2))
    with pytest.raises(ValueError, match="active must list distinct"):
        multi_adapter_linear(x, w, b, specs, active=[0, 0])
    with pytest.raises(ValueError, match="exactly one of row_adapter"):
        multi_adapter_linear(x, w, b, specs)
    with torch.no_grad(), pytest.raises(ValueError, match="DoRA adapter has active dropout"):
        multi_adapter_linear(x, w, b, specs, active=[0, 1], training=True, backend="triton")
    specs[1].lora_a.requires_grad_(True)
    with pytest.raises(ValueError, match="a gradient is needed through a DoRA adapter"):
        multi_adapter_linear(x, w, b, specs, active=[0, 1], backend="triton")


def test_layer_on_triton_refuses_training_through_dora_with_several_active_adapters():
    layer = _layer_with_adapters("triton")  # adapter "b" is DoRA
    model = nn.Sequential(layer).train()
    set_active_adapters(model, ["a", "b"])
    with pytest.raises(ValueError, match="gradient is needed through a DoRA adapter"):
        model(torch.randn(4, 24, device=KERNEL_DEV))
    set_active_adapters(model, ["a", "c"])  # LoRA only: the kernels train it
    model(torch.randn(4, 24, device=KERNEL_DEV)).sum().backward()
    assert layer.adapters["a"].lora_A.grad is not None and layer.adapters["c"].lora_B.grad is not None


def test_set_adapter_list_errors_and_merge_refused():
    layer = _layer_with_adapters("torch")
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="adapter_names must be distinct adapter names"):
        set_active_adapters(model, ["a", "zzz"])
    set_active_adapters(model, ["a", "c"])
    with pytest.raises(RuntimeError, match="several adapters are active"):
        lk.merge(model)
    with pytest.raises(RuntimeError, match="is active"):
        layer.delete_adapter("c")
    lk.set_adapter(model, "b")  # back to one adapter
    assert layer.__dict__.get("_lk_multi_active") is None
    assert multi_functional.resolve_multi_backend("auto", torch.zeros(1, 2), [], [], False, False) == "torch"


def test_converted_peft_model_runs_several_active_and_adapter_names_on_our_paths(monkeypatch):
    from lora_kernels.peft import convert

    peft_model, _ = _peft_and_ours(0.0)
    peft_model.eval()
    x = torch.randn(4, 3, 12)
    names = ["third", "__base__", "first", "third"]
    with torch.no_grad():
        expected_active = peft_model(x)
        peft_model.base_model.set_adapter("first")
        expected_mixed = peft_model(x, adapter_names=names)
        peft_model.base_model.set_adapter(["first", "second", "third"])
    converted, skipped = convert(peft_model)
    assert converted and not skipped
    calls = []
    real = multi_functional.multi_adapter_linear
    monkeypatch.setattr("lora_kernels.multi.peft_glue.multi_adapter_linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected_active, rtol=1e-5, atol=1e-5)
        peft_model.base_model.set_adapter("first")
        torch.testing.assert_close(peft_model(x, adapter_names=names), expected_mixed, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # two layers, two calls: our path ran, not PEFT's loop


def test_multi_bench_validates_and_labels_cpu_timings():
    from lora_kernels.multi import bench

    rows = bench.run([bench.Scenario(3, 8, 2, 16, 24, 4, "zipf")], reps=1, allow_interpreter=True, log=lambda *_: None)
    assert {r["provider"] for r in rows} == {"base", "peft_loop", "merge_each", "multi_torch", "multi_triton"}
    assert all(r["timing"].startswith("cpu") and r["median_ms"] > 0 for r in rows)
    assert all("model" in r["model_note"] and r["modeled_kernel_path_us"] > 0 for r in rows)
    assert "(modeled)" in bench.markdown(rows) and "not GPU figures" in bench.markdown(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_conv1d_and_per_slice_adapters_in_mixed_batches(backend):
    from .models import tiny_gpt2

    model = tiny_gpt2().to(_dev(backend))
    lk.inject(model, lk.LoraConfig(rank=4, target_modules=["c_attn", "c_proj"],
                                   enable_lora={"c_attn": [True, False, True]}), adapter_name="p", backend=backend)
    lk.inject(model, lk.LoraConfig(rank=2, alpha=6, target_modules=["c_attn"]), adapter_name="q")
    randomize_adapters(model)
    ids = tokens(batch=3, seq=5).to(_dev(backend))
    names = ["q", "p", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = []
        for i, name in enumerate(names):
            with (lk.adapters_disabled(model) if name == "__base__" else _active(model, name)):
                expected.append(model(input_ids=ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_mixed_batch_under_autocast_computes_in_the_autocast_dtype():
    layer = _layer_with_adapters("torch")
    model = nn.Sequential(layer)
    lk.multi.enable_adapter_names(model)
    names = ["b", "a", "__base__"]
    x = torch.randn(3, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, adapter_names=names)
        expected = []
        for i, name in enumerate(names):
            if name == "__base__":
                expected.append(layer.base_layer(x[i:i + 1]))
            else:
                layer.set_adapter(name)
                expected.append(layer(x[i:i + 1]))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.cat(expected), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("targets", [(["lin0"], ["lin0"]), (["lin0"], ["lin1"]), (["lin0"], ["lin0", "lin1"])],
                         ids=["same-layers", "different-layers", "partly-overlapping"])
def test_converted_peft_mixed_batches_follow_peft_checks(targets):
    """PEFT's own mixed-batch check (tests/test_custom_models.py, TestMixedAdapterBatches.run_checks),
    on a converted model: rows alternate base / adapter0 / adapter1 and must equal each run alone."""
    from lora_kernels.peft import convert

    torch.manual_seed(0)
    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(target_modules=targets[0], init_lora_weights=False),
                                adapter_name="adapter0").eval()
    model.add_adapter("adapter1", peft.LoraConfig(target_modules=targets[1], r=16, init_lora_weights=False))
    x = torch.randn(9, 12)
    with torch.no_grad():  # each adapter alone, on PEFT's own forward
        with model.disable_adapter():
            out_base = model(x)
        model.set_adapter("adapter0")
        out0 = model(x)
        model.set_adapter("adapter1")
        out1 = model(x)
    convert(model)
    with torch.no_grad():
        adapters = ["__base__", "adapter0", "adapter1"]
        mixed = model(x, adapter_names=[adapters[i % 3] for i in range(9)])
        with model.disable_adapter():  # disabling takes precedence over adapter_names
            torch.testing.assert_close(model(x, adapter_names=[adapters[i % 3] for i in range(9)]), out_base)
    assert not torch.allclose(out0, out_base) and not torch.allclose(out1, out_base)
    torch.testing.assert_close(mixed[::3], out_base[::3])
    torch.testing.assert_close(mixed[1::3], out0[1::3])
    torch.testing.assert_close(mixed[2::3], out1[2::3])


def test_disabled_adapters_take_precedence_over_adapter_names():
    layer = _layer_with_adapters("torch")
    model = nn.Sequential(layer)
    lk.multi.enable_adapter_names(model)
    x = torch.randn(3, 24)
    with torch.no_grad(), lk.adapters_disabled(model):
        torch.testing.assert_close(model(x, adapter_names=["a", "b", "c"]), layer.base_layer(x))

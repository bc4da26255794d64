"""Shared-input projection groups (lora_kernels/groups.py), applied by inject / load_adapter / convert:
a grouped model equals the opted-out (ungrouped) one under the same torch RNG state — outputs,
gradients, losses — in every state a LoRA model has; one grouped op per group and forward; module
names and state dict unchanged; the group steps aside where it cannot apply, and its safety net
keeps cross-attention-like callers correct."""
import copy
import io
import warnings

import pytest
import torch
import transformers
from torch import nn

import lora_kernels as lk
from lora_kernels import grouped as _grouped_ops  # noqa: F401  (registers lora_kernels::grouped_lora_fwd)
from lora_kernels import groups
from lora_kernels.multi.glue import adapter_names_context
from tests.models import tiny_llama, tokens

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_GROUPS = [[f"model.layers.{i}.{p}.{n}" for n in names]
                for i in range(2) for p, names in (("self_attn", ("q_proj", "k_proj", "v_proj")),
                                                   ("mlp", ("gate_proj", "up_proj")))]


def _tiny(family, seed=0, layers=2):
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    if family == "qwen2":  # q/k/v with biases
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw)).eval()
    raise ValueError(family)


def _randomize(model, seed=7):
    with torch.no_grad():  # B away from zero so every gradient is non-trivial
        g = torch.Generator().manual_seed(seed)
        for layer in lk.model.lora_layers(model).values():
            for a in layer.adapters.values():
                a.lora_B.copy_(0.3 * torch.randn(a.lora_B.shape, generator=g))


def _pair(dropout, family="llama", layers=2, backend=None, **cfg):
    """(ungrouped, grouped): the same base, adapters and weights; only the opt-out differs."""
    grouped = _tiny(family, layers=layers).train()
    lk.inject(grouped, lk.LoraConfig(rank=4, alpha=8, dropout=dropout, target_modules=TARGETS, **cfg), backend=backend)
    _randomize(grouped)
    plain = _tiny(family, layers=layers).train()
    lk.inject(plain, lk.LoraConfig(rank=4, alpha=8, dropout=dropout, target_modules=TARGETS, group_projections=False,
                                   **cfg), backend=backend)
    plain.load_state_dict(grouped.state_dict())
    return plain, grouped


def _step(model, ids, seed):
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model = getattr(model, "_orig_mod", model)  # a compiled model's parameters, by their own names
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (la, ya, ga), (lb, yb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=n)


def _calls():
    return groups.GROUP_CALLS["count"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_inject_groups_by_default_and_equals_the_opt_out(family, dropout):
    plain, grouped = _pair(dropout, family)
    made = lk.projection_groups(grouped)
    assert [g["members"] for g in made] == LLAMA_GROUPS
    assert all(g["applies"] and g["reason"] is None and g["kind"] == "lora" for g in made)
    assert lk.projection_groups(plain) == []
    assert list(plain.state_dict()) == list(grouped.state_dict())
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in grouped.named_modules()]
    assert {type(m) for m in grouped.modules()} == {type(m) for m in plain.modules()}
    ids = tokens(batch=2, seq=12)
    before = _calls()
    ref = _step(plain, ids, seed=11)
    assert _calls() == before
    got = _step(grouped, ids, seed=11)
    assert _calls() - before == 4  # 2 layers x (q/k/v, gate/up): one op per group and forward
    _assert_same(ref, got)
    if dropout:  # another RNG state gives other masks: the equality above is not trivial
        assert (_step(grouped, ids, seed=12)[1] - got[1]).abs().max() > 1e-4
        # the RNG is left where the separate layers leave it: the next draws agree too
        torch.manual_seed(5)
        plain(input_ids=ids)
        after_plain = torch.randint(0, 2**62, (1,))
        torch.manual_seed(5)
        grouped(input_ids=ids)
        assert torch.equal(torch.randint(0, 2**62, (1,)), after_plain)


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_steps_and_gradient_checkpointing_match(reentrant):
    """Checkpointed training, 3 AdamW steps: the recomputed forward re-draws the same seeds (torch
    restores the CPU RNG state), so the group recomputes exactly what the separate layers would."""
    plain, grouped = _pair(0.2, layers=1)
    ids = tokens(batch=2, seq=10)
    for model in (plain, grouped):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    losses = {}
    for name, model in (("plain", plain), ("grouped", grouped)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for step in range(3):
            torch.manual_seed(100 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["grouped"] == pytest.approx(losses["plain"], rel=1e-6)
    assert losses["grouped"][-1] < losses["grouped"][0]
    for (n, p), (_, q) in zip(plain.named_parameters(), grouped.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_no_session_or_cache_outlives_the_forward():
    _, grouped = _pair(0.1, layers=1)
    gs = [g for m in grouped.modules() for g in m.__dict__.get("_lk_projection_groups", ())]
    assert len(gs) == 2
    ids = tokens(batch=1, seq=6)
    grouped(input_ids=ids)
    assert all(g._live == {} for g in gs)
    # an exception inside the parent's forward still closes the session (always-called hook)
    attn = grouped.model.layers[0].self_attn
    def boom(*args):
        raise RuntimeError("boom")

    hook = attn.k_proj.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        grouped(input_ids=ids)
    hook.remove()
    assert all(g._live == {} for g in gs)
    assert all(g.stopped is None for g in gs)
    # members called outside their parent's forward compute alone
    before = _calls()
    attn.q_proj(torch.randn(2, 32))
    assert _calls() == before


@pytest.mark.parametrize("how", ["merge", "disable", "dora_adapter", "several_active", "adapter_names",
                                 "dropout_mismatch", "weight_trains", "eval"])
def test_states_where_the_group_steps_aside_stay_exact(how):
    plain, grouped = _pair(0.2, layers=1)
    ids = tokens(batch=2, seq=8)
    for model in (plain, grouped):
        if how in ("dora_adapter", "several_active", "adapter_names"):
            lk.inject(model, lk.LoraConfig(rank=2, alpha=4, dropout=0.2, target_modules=TARGETS,
                                           use_dora=how == "dora_adapter",
                                           group_projections=model is grouped), adapter_name="second")
            _randomize(model, seed=9)
            if model is grouped:
                grouped.load_state_dict(plain.state_dict())  # the second adapters' A: same values
        if how == "dropout_mismatch":
            model.model.layers[0].self_attn.k_proj.active.dropout = 0.1
        if how == "weight_trains":
            model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        if how == "eval":
            model.eval()

    def run(model):
        torch.manual_seed(3)
        if how == "merge":
            lk.merge(model)
            with torch.no_grad():
                return model(input_ids=ids).logits, None
        if how == "disable":
            with lk.adapters_disabled(model), torch.no_grad():
                return model(input_ids=ids).logits, None
        if how == "dora_adapter":
            lk.set_adapter(model, "second")
            y = model(input_ids=ids).logits
        elif how == "several_active":
            lk.set_adapter(model, ["default", "second"])
            y = model(input_ids=ids).logits
        elif how == "adapter_names":
            with torch.no_grad(), adapter_names_context(model, ["second", "default"]):
                return model(input_ids=ids).logits, None
        else:
            y = model(input_ids=ids).logits
        y.pow(2).mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = _calls()
    y_ref, g_ref = run(plain)
    mid = _calls()
    y_grp, g_grp = run(grouped)
    reports = lk.projection_groups(grouped)
    if how in ("merge", "disable", "dora_adapter", "several_active"):
        assert _calls() == mid
    if how == "merge":
        assert not reports[0]["applies"] and "merged" in reports[0]["reason"]
    if how == "dora_adapter":
        assert "DoRA" in reports[0]["reason"]
    if how == "dropout_mismatch":  # attention steps aside, the MLP still groups
        assert "dropout rates differ" in reports[0]["reason"] and reports[1]["applies"]
        assert _calls() - mid == 1
    if how == "weight_trains":
        assert reports[0]["applies"] and "requires_grad" in reports[1]["reason"]
        assert _calls() - mid == 1
    if how in ("adapter_names", "eval"):
        assert _calls() - mid == (0 if how == "adapter_names" else 2)
    assert mid == before
    torch.testing.assert_close(y_grp, y_ref, rtol=1e-5, atol=1e-6)
    if g_ref is not None:
        assert g_ref.keys() == g_grp.keys()
        for n in g_ref:
            torch.testing.assert_close(g_grp[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    if how == "merge":
        lk.unmerge(grouped)
        lk.unmerge(plain)
        assert lk.projection_groups(grouped)[0]["applies"]
        _assert_same(_step(plain, ids, 4), _step(grouped, ids, 4))


@pytest.mark.parametrize("kind", ["lora", "peft"])
def test_a_member_without_an_active_adapter_is_passive(kind):
    """Adapter "b" covers q and v only: with "b" active, k computes its base output alone (no seed)
    and the group computes q and v; the RNG stays the separate layers'."""
    if kind == "lora":
        plain, grouped = _pair(0.3, layers=1)
        for model in (plain, grouped):
            lk.inject(model, lk.LoraConfig(rank=2, dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"]),
                      adapter_name="b", group_projections=model is grouped)
            _randomize(model, seed=4)
        grouped.load_state_dict(plain.state_dict())
        for model in (plain, grouped):
            lk.set_adapter(model, "b")
    else:
        peft = pytest.importorskip("peft")
        ref = _peft_llama(0.3).train()
        ref.add_adapter("b", peft.LoraConfig(r=2, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"],
                                             init_lora_weights=False))
        ref.set_adapter("b")
        plain, grouped = copy.deepcopy(ref), copy.deepcopy(ref)
        lk.peft.convert(plain, group_projections=False)
        lk.peft.convert(grouped)
    reports = lk.projection_groups(grouped)
    assert reports[0]["applies"], reports
    assert reports[1]["reason"] == "fewer than two members have an active adapter"  # gate has none, up has
    ids = tokens(batch=2, seq=8)
    before = _calls()
    got = _step(grouped, ids, seed=6)
    assert _calls() - before == 1
    _assert_same(_step(plain, ids, seed=6), got)


def test_per_slice_member_steps_aside():
    plain, grouped = _pair(0.2, layers=1, enable_lora={"k_proj": [True, False]})
    reports = lk.projection_groups(grouped)
    assert "k_proj: adapter 'default' is per-slice (enable_lora)" == reports[0]["reason"] and reports[1]["applies"]
    ids = tokens(batch=2, seq=8)
    before = _calls()
    got = _step(grouped, ids, seed=3)
    assert _calls() - before == 1
    _assert_same(_step(plain, ids, seed=3), got)


def test_save_load_round_trip_deepcopy_pickle_and_merge_and_unload(tmp_path):
    plain, grouped = _pair(0.0, layers=1)
    ids = tokens(batch=1, seq=8)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    lk.save_adapter(grouped, tmp_path / "a")
    fresh = _tiny("llama", layers=1)
    lk.load_adapter(fresh, tmp_path / "a")
    assert len(lk.projection_groups(fresh)) == 2
    opted_out = _tiny("llama", layers=1)
    lk.load_adapter(opted_out, tmp_path / "a", group_projections=False)
    assert lk.projection_groups(opted_out) == []
    copied = copy.deepcopy(grouped)
    for model in (fresh, copied):
        model.eval()
        assert list(model.state_dict()) == list(plain.state_dict())
        gs = [g for m in model.modules() for g in m.__dict__.get("_lk_projection_groups", ())]
        members = {id(m) for g in gs for m in g.members}
        assert members <= {id(m) for m in model.modules()}  # the copy's own layers, not the original's
        before = _calls()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        assert _calls() - before == 2
    lk.merge_and_unload(copied)
    assert lk.projection_groups(copied) == []
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_generate_in_eval_equals_the_opt_out():
    plain, grouped = _pair(0.1, layers=1)
    ids = tokens(batch=1, seq=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out_plain = plain.eval().generate(ids, **kw)
    before = _calls()
    out_grouped = grouped.eval().generate(ids, **kw)
    assert _calls() - before == 2 * 4  # one op per group per decoding step
    assert torch.equal(out_grouped, out_plain)
    with torch.inference_mode():  # inference tensors have no version counter: identity only
        torch.testing.assert_close(grouped(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_threads_share_a_grouped_model():
    """Sessions are per thread: concurrent forwards of one model each get their own members' outputs."""
    import threading

    plain, grouped = _pair(0.0, layers=1)
    plain.eval()
    grouped.eval()
    inputs = [tokens(batch=1, seq=4 + i, seed=i) for i in range(6)]
    with torch.no_grad():
        expected = [plain(input_ids=ids).logits for ids in inputs]
    got = [None] * len(inputs)

    def work(indices):
        with torch.no_grad():
            for _ in range(3):
                for i in indices:
                    got[i] = grouped(input_ids=inputs[i]).logits

    threads = [threading.Thread(target=work, args=(range(k, len(inputs), 2),)) for k in range(2)]
    before = _calls()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _calls() - before == 3 * len(inputs) * 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert all(g["applies"] for g in lk.projection_groups(grouped))  # no safety-net stop


def test_autocast_bf16_equals_the_opt_out():
    plain, grouped = _pair(0.2, layers=1)
    ids = tokens(batch=2, seq=8)
    outs = []
    for model in (plain, grouped):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(input_ids=ids).logits
        y.float().pow(2).mean().backward()
        outs.append((y.detach().float(), model.model.layers[0].self_attn.k_proj.lora_A.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=5e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# explicit groups on any parent, and the safety net


class _Attn(nn.Module):
    """q reads h; k and v read ``kv`` (cross-attention when kv is not h); ``use`` picks what is returned."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, h, kv=None, partial=False):
        kv = h if kv is None else kv
        q, k, v = self.q_proj(h), self.k_proj(kv), self.v_proj(kv)
        return q[..., :8].sum(1) * 2 + v.sum(1) if partial else q[..., :8].sum(1) * k.sum(1) + v.sum(1)


def _attn_pair(dropout):
    torch.manual_seed(0)
    plain = _Attn().train()
    lk.inject(plain, lk.LoraConfig(rank=4, alpha=8, dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert lk.projection_groups(plain) == []  # not a known parent class: inject does not group it
    _randomize(plain)
    grouped = copy.deepcopy(plain)
    assert groups.group_projections(grouped) == [["q_proj", "k_proj", "v_proj"]]
    assert groups.group_projections(grouped) == [["q_proj", "k_proj", "v_proj"]]  # idempotent
    return plain, grouped


def _run(model, h, kv=None, partial=False, seed=3, forward=None):
    h = h.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = (model if forward is None else forward)(h, kv, partial)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), h.grad, grads


@pytest.mark.parametrize("partial", [False, True])
def test_explicit_group_on_any_parent_and_dx_accumulation(partial):
    """Also when k's output is used by nothing (partial): no gradient for k, dx sums q and v."""
    plain, grouped = _attn_pair(0.25)
    buf = io.BytesIO()
    torch.save(grouped, buf)  # the group pickles with its members
    buf.seek(0)
    grouped = torch.load(buf, weights_only=False)
    h = torch.randn(3, 5, 16)
    before = _calls()
    for a, b in zip(_run(plain, h, partial=partial), _run(grouped, h, partial=partial)):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for n in a:
                torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert _calls() - before == 1


def test_cross_attention_stays_correct_and_switches_the_group_off():
    plain, grouped = _attn_pair(0.25)
    h, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    g = grouped.__dict__["_lk_projection_groups"][0]
    ref = _run(plain, h, kv)
    with pytest.warns(RuntimeWarning, match="called with another tensor"):
        got = _run(grouped, h, kv)
    # outputs are those of the separate layers in distribution (k, v masks come from other draws),
    # exactly so at p = 0; from now on the group is off and every member computes alone
    assert g.stopped and "another tensor" in g.stopped
    assert not lk.projection_groups(grouped)[0]["applies"]
    before = _calls()
    ref2, got2 = _run(plain, h, kv, seed=9), _run(grouped, h, kv, seed=9)
    assert _calls() == before
    for a, b in zip(ref2[:2], got2[:2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # at p = 0 the safety-net forward itself is exact
    plain0, grouped0 = _attn_pair(0.0)
    with pytest.warns(RuntimeWarning):
        got0 = _run(grouped0, h, kv)
    ref0 = _run(plain0, h, kv)
    torch.testing.assert_close(got0[0], ref0[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got0[1], ref0[1], rtol=1e-5, atol=1e-6)


def test_a_non_first_member_without_a_cache_hit_computes_only_its_own_output():
    _, grouped = _attn_pair(0.25)
    before = _calls()
    torch.manual_seed(0)
    grouped.k_proj(torch.randn(2, 16))  # outside the parent: alone
    state = torch.get_rng_state()
    torch.manual_seed(0)
    torch.randn(2, 16)
    torch.randint(0, 2**62, (1,))  # exactly one seed drawn (k's own)
    assert torch.equal(torch.get_rng_state(), state)
    assert _calls() == before


@pytest.mark.parametrize("calls, message", [(("q_proj", "v_proj"), "out of order"),
                                             (("q_proj",), "never called")])
def test_skipped_members_switch_the_group_off_and_stay_exact(calls, message):
    """A parent that skips k (v then comes out of order) or calls q only (k and v were computed for
    nothing): RuntimeWarning, the group switches off, the outputs are the separate layers' (p = 0)."""
    plain, grouped = _attn_pair(0.0)
    h = torch.randn(2, 4, 16)

    def only(model):
        return lambda h, kv=None, partial=False: torch.cat([getattr(model, n)(h) for n in calls], -1)

    plain.forward, grouped.forward = only(plain), only(grouped)
    with torch.no_grad():
        expected = plain(h)
        with pytest.warns(RuntimeWarning, match=message):
            got = grouped(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert message in grouped.__dict__["_lk_projection_groups"][0].stopped


def _lm_loss(model):
    """The loss through the decoder stack and head (the top model's adapter_names hook is not
    traceable by torch 2.11's dynamo; the groups' hooks sit on the attention / MLP modules inside)."""
    def f(ids):
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return f


def _loss_step(fn, model, ids, seed):
    torch.manual_seed(seed)
    loss = fn(ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _op_counts(gm) -> dict:
    """How many grouped and single-layer LoRA ops a captured FX graph holds (its subgraphs included:
    an activation checkpoint's body is one)."""
    ops = {"grouped": torch.ops.lora_kernels.grouped_lora_fwd, "single": torch.ops.lora_kernels.lora_linear_fwd}
    targets = [getattr(n.target, "overloadpacket", n.target) for m in gm.modules()
               if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes if n.op == "call_function"]
    return {k: sum(t is op for t in targets) for k, op in ops.items()}


def _compile(fn, inner, found):
    """torch.compile(fullgraph=True) with a backend that records each captured graph's op counts in
    ``found``, then runs it through ``inner`` ("eager": dynamo's graph as is; "aot_eager": also
    AOTAutograd's forward and backward graphs)."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        found.append(_op_counts(gm))
        return lookup_backend(inner)(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True)


def _assert_grads(got, ref):
    assert got.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_torch_compile_traces_one_grouped_op_per_group_and_matches_eager(inner, dropout):
    """fullgraph: the graph holds ONE grouped_lora_fwd per group (2 per block) and the single-layer op
    only for o_proj / down_proj; the seeds are drawn in the graph in member order, so compiled equals
    the opted-out eager model under the same torch RNG state, and a new RNG state needs no recompile."""
    torch._dynamo.reset()
    plain, grouped = _pair(dropout, layers=1)
    ids = tokens(batch=1, seq=8)
    found = []
    compiled = _compile(_lm_loss(grouped), inner, found)
    before = _calls()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (5, 6):
            loss_c, grads_c = _loss_step(compiled, grouped, ids, seed=seed)
            loss_e, grads_e = _loss_step(_lm_loss(plain), plain, ids, seed=seed)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
            _assert_grads(grads_c, grads_e)
            if seed == 5:
                first = loss_c
    assert found == [{"grouped": 2, "single": 2}]  # one graph, one grouped op per group
    assert _calls() == before  # (the eager counter: the compiled calls ran the graph, not the eager group)
    assert (loss_c != first) == (dropout > 0)  # another RNG state, other masks
    loss_g, _ = _loss_step(_lm_loss(grouped), grouped, ids, seed=6)  # eager again: grouped, same loss
    assert _calls() - before == 2
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_torch_compile_under_autocast_equals_the_eager_group():
    """bf16 autocast: the traced group casts as the eager one does; compiled equals eager within bf16
    rounding (torch 2.11's compiled graph rounds differently from eager by an ulp, grouped or not)."""
    torch._dynamo.reset()
    _, grouped = _pair(0.3, layers=1)
    ids = tokens(batch=1, seq=8)
    found = []
    compiled = _compile(_lm_loss(grouped), "aot_eager", found)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c, grads_c = _loss_step(compiled, grouped, ids, seed=5)
        loss_e, grads_e = _loss_step(_lm_loss(grouped), grouped, ids, seed=5)
    assert found == [{"grouped": 2, "single": 2}]
    assert loss_c.dtype == loss_e.dtype
    torch.testing.assert_close(loss_c, loss_e, rtol=1.6e-2, atol=1e-3)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        assert grads_c[n].dtype == grads_e[n].dtype == torch.float32, n
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1.6e-2, atol=4e-3, msg=n)
    torch._dynamo.reset()


def test_torch_compile_opt_out_and_hand_made_groups_have_no_grouped_op():
    """The opted-out model's graph has the seven single-layer ops and no grouped one; members called
    outside their parent's forward compute alone; a group made by
    group_projections under a parent that is not a KNOWN_PARENTS class steps aside under compile (its
    safety net needs what dynamo cannot trace): three single ops, results equal the ungrouped ones."""
    torch._dynamo.reset()
    plain, _ = _pair(0.3, layers=1)
    found = []
    _loss_step(_compile(_lm_loss(plain), "eager", found), plain, tokens(batch=1, seq=8), seed=1)
    assert found == [{"grouped": 0, "single": 7}]
    # members called on their own (not inside their parent's forward) compute alone, as in eager
    _, grouped = _pair(0.3, layers=1)
    attn = grouped.model.layers[0].self_attn
    h = torch.randn(1, 4, 32)
    found = []
    compiled = _compile(lambda h: attn.q_proj(h).sum() + attn.k_proj(h).sum(), "eager", found)
    torch.manual_seed(2)
    got = compiled(h)
    torch.manual_seed(2)
    ref = attn.q_proj(h).sum() + attn.k_proj(h).sum()
    assert found == [{"grouped": 0, "single": 2}]
    torch.testing.assert_close(got, ref)
    attn_plain, attn_grouped = _attn_pair(0.25)
    h = torch.randn(3, 5, 16)
    found = []
    compiled = _compile(attn_grouped.forward, "eager", found)  # (its adapter_names hook: see _lm_loss)
    got = _run(attn_grouped, h, forward=compiled)
    assert found == [{"grouped": 0, "single": 3}]
    ref = _run(attn_plain, h)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    _assert_grads(got[2], ref[2])
    torch._dynamo.reset()


def test_torch_compile_groups_inside_activation_checkpointing():
    """transformers' gradient checkpointing under torch.compile: dynamo traces each decoder layer as a
    checkpoint subgraph, which refuses mutations of objects from outside it; the grouped ops are in
    that subgraph and the compiled, checkpointed model equals the eager opted-out one."""
    torch._dynamo.reset()
    plain, grouped = _pair(0.3, layers=1)
    grouped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grouped.disable_input_require_grads()  # (its requires_grad_() hook on the embeddings is not compilable)
    ids = tokens(batch=1, seq=8)

    def loss(model):  # use_cache=False: transformers' warning about it is not traceable
        def f(ids):
            logits = model.lm_head(model.model(input_ids=ids, use_cache=False).last_hidden_state)
            return nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        return f

    found = []
    loss_c, grads_c = _loss_step(_compile(loss(grouped), "aot_eager", found), grouped, ids, seed=3)
    assert found == [{"grouped": 2, "single": 2}]
    loss_e, grads_e = _loss_step(loss(plain), plain, ids, seed=3)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    _assert_grads(grads_c, grads_e)
    # the MLP alone checkpointed, its input made outside the checkpoint: the parent's hook hands the
    # members a view made inside it (a mutation of the caller's tensor would be refused there)
    h = torch.randn(2, 5, 32)

    def mlp_loss(model):
        from torch.utils.checkpoint import checkpoint

        mlp = model.model.layers[0].mlp
        return lambda h: checkpoint(mlp, h * 1.5, use_reentrant=False).square().sum()

    def mlp_step(fn, model):
        mlp = model.model.layers[0].mlp
        return _loss_step(fn, mlp, h, seed=4)  # (grads of the MLP's adapters only)

    found = []
    loss_c, grads_c = mlp_step(_compile(mlp_loss(grouped), "aot_eager", found), grouped)
    assert found == [{"grouped": 1, "single": 1}]
    loss_e, grads_e = mlp_step(mlp_loss(plain), plain)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    _assert_grads(grads_c, grads_e)
    torch._dynamo.reset()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["fused", "hybrid", "triton"])
def test_triton_backends_in_the_interpreter_match_the_opt_out(backend, kernel_device, monkeypatch):
    """The ungrouped model runs the Triton kernels (counted), the grouped one the group's op with the
    same seeds: equal outputs and gradients (the dropout masks are one definition on every path)."""
    from lora_kernels import triton_backend

    plain, grouped = (m.to(kernel_device) for m in _pair(0.3, layers=1, backend=backend))
    ids = tokens(batch=1, seq=6).to(kernel_device)
    launches = {"n": 0}
    real = triton_backend.lora_linear_fwd

    def counted(*args, **kwargs):
        launches["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "lora_linear_fwd", counted)
    before = _calls()
    got = _step(grouped, ids, seed=2)
    assert _calls() - before == 2 and launches["n"] == 2  # o_proj and down_proj alone
    ref = _step(plain, ids, seed=2)
    assert launches["n"] == 2 + 7
    _assert_same(ref, got, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
def test_torch_compile_runs_the_grouped_triton_kernels(kernel_device):
    """Compiled (dynamo's graph run as is) on the fused backend: the grouped op in the graph runs the
    grouped Triton kernels (the interpreter on CPU) and equals the opted-out eager model."""
    torch._dynamo.reset()
    plain, grouped = (m.to(kernel_device) for m in _pair(0.3, layers=1, backend="fused"))
    ids = tokens(batch=1, seq=6).to(kernel_device)
    found = []
    loss_c, grads_c = _loss_step(_compile(_lm_loss(grouped), "eager", found), grouped, ids, seed=2)
    assert found == [{"grouped": 2, "single": 2}]
    loss_e, grads_e = _loss_step(_lm_loss(plain), plain, ids, seed=2)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    _assert_grads(grads_c, grads_e)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# PEFT convert


def _peft_llama(dropout):
    peft = pytest.importorskip("peft")
    base = _tiny("llama", layers=1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_converted_peft_model_is_grouped_and_equals_peft_and_the_opt_out(dropout):
    ref = _peft_llama(dropout).train()
    grouped, plain = copy.deepcopy(ref), copy.deepcopy(ref)
    lk.peft.convert(grouped)
    lk.peft.convert(plain, group_projections=False)
    made = lk.projection_groups(grouped)
    assert [g["members"] for g in made] == [["base_model.model." + n for n in g] for g in LLAMA_GROUPS[:2]]
    assert all(g["kind"] == "peft" and g["applies"] for g in made)
    assert lk.projection_groups(plain) == []
    assert list(grouped.state_dict()) == list(ref.state_dict())
    ids = tokens(batch=2, seq=8)
    before = _calls()
    got = _step(grouped, ids, seed=4)
    assert _calls() - before == 2
    _assert_same(_step(plain, ids, seed=4), got)
    if dropout == 0.0:
        _assert_same(_step(ref, ids, seed=4), got, rtol=1e-5, atol=1e-5)
    # PEFT states: disabled, merged -> the group steps aside, results stay PEFT's
    with grouped.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(grouped(input_ids=ids).logits, ref(input_ids=ids).logits)
    lk.peft.unconvert(grouped)
    assert lk.projection_groups(grouped) == []
    assert not any("_lk_group" in m.__dict__ for m in grouped.modules())


def test_converted_peft_model_under_torch_compile_has_one_grouped_op_per_group():
    torch._dynamo.reset()
    ref = _peft_llama(0.2).train()
    grouped, plain = copy.deepcopy(ref), copy.deepcopy(ref)
    lk.peft.convert(grouped)
    lk.peft.convert(plain, group_projections=False)
    ids = tokens(batch=1, seq=8)
    found = []
    inner = grouped.base_model.model
    compiled = _compile(_lm_loss(inner), "aot_eager", found)
    loss_c, grads_c = _loss_step(compiled, inner, ids, seed=4)
    assert found == [{"grouped": 2, "single": 2}]
    loss_e, grads_e = _loss_step(_lm_loss(plain.base_model.model), plain.base_model.model, ids, seed=4)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    _assert_grads(grads_c, grads_e)
    torch._dynamo.reset()


def test_reconvert_hands_back_and_dissolves_the_group():
    model = _peft_llama(0.0)
    lk.peft.convert(model)
    assert len(lk.projection_groups(model)) == 2
    attn = model.base_model.model.model.layers[0].self_attn
    attn.k_proj.lora_dropout["default"] = nn.AlphaDropout(0.1)  # not convertible: handed back to PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, skipped = lk.peft.convert(model)
    assert any(n.endswith("self_attn.k_proj") for n in skipped)
    # k_proj is now PEFT's own layer (it draws from the RNG) between q and v: no attention group
    assert [g["members"][0].rsplit(".", 1)[1] for g in lk.projection_groups(model)] == ["gate_proj"]


def test_refusals_and_options():
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM has two or more"):
        groups.group_projections(tiny_llama(0))
    with pytest.raises(TypeError, match="groups must be"):
        groups.group_projections(tiny_llama(0), groups="q_proj")
    with pytest.raises(TypeError, match="group_projections must be a bool"):
        lk.LoraConfig(group_projections="yes")
    with pytest.raises(TypeError, match="group_projections must be a bool"):
        lk.inject(tiny_llama(0), lk.LoraConfig(target_modules=TARGETS), group_projections=1)
    model = tiny_llama(0)
    lk.inject(model, lk.LoraConfig(target_modules=TARGETS), group_projections=False)  # keyword beats config
    assert lk.projection_groups(model) == []
    assert groups.ungroup_projections(model) == 0
    lk.inject(model, lk.LoraConfig(target_modules=TARGETS), adapter_name="b")  # a later inject groups
    assert len(lk.projection_groups(model)) == 4
    assert groups.ungroup_projections(model) == 10
    assert lk.projection_groups(model) == []
    # only q and v adapted (the family default): k is a plain Linear between them, which draws nothing
    qv = tiny_llama(0)
    lk.inject(qv, lk.LoraConfig(rank=4))
    assert [g["members"][-1].rsplit(".", 1)[1] for g in lk.projection_groups(qv)] == ["v_proj", "v_proj"]
    # adapting k later, opted out: a LoRA k between q and v would draw its own seed, so the q/v
    # groups are dissolved, not left stale; opted in, q/k/v groups replace them
    lk.inject(qv, lk.LoraConfig(rank=4, target_modules=["k_proj"]), adapter_name="k", group_projections=False)
    assert lk.projection_groups(qv) == []
    lk.inject(qv, lk.LoraConfig(rank=4, target_modules=["k_proj"]), adapter_name="k2")
    assert [len(g["members"]) for g in lk.projection_groups(qv)] == [3, 3]


# ------------------------------------------------------------------------------------------------
# regressions from the review (/tmp/review/r*.py)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_trained_base_weight_without_grad_is_grouped_and_equals_the_opt_out(mode):
    """A base weight that requires grad, evaluated with grad disabled: the group hands the op the
    weight detached (nothing is recorded either way) instead of crashing in grouped_lora."""
    plain, grouped = _pair(0.0, layers=1)
    for model in (plain, grouped):
        model.eval()
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    ids = tokens(batch=1, seq=5)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        expected = plain(input_ids=ids).logits
        before = _calls()
        got = grouped(input_ids=ids).logits
    assert _calls() - before == 2  # both groups computed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # with grad enabled the group steps aside (it computes no weight gradient): still exact
    _assert_same(_step(plain.train(), ids, seed=1), _step(grouped.train(), ids, seed=1))


def test_merge_from_another_thread_lands_wholly_before_or_after_the_group():
    """The group reads its members' state under their readers locks: a merge() that arrives while the
    group is reading waits for the grouped op (the adapter is never added twice)."""
    import threading
    import time

    plain, grouped = _pair(0.0, layers=1)
    plain.eval()
    grouped.eval()
    ids = tokens(batch=1, seq=5)
    with torch.no_grad():
        unmerged = plain(input_ids=ids).logits
        plain.model.layers[0].self_attn.q_proj.merge()
        merged = plain(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 1e-4  # merging is exact: both states give one result
    q = grouped.model.layers[0].self_attn.q_proj
    orig = groups.ProjectionGroup.specs
    threads = []

    def specs(self):  # another thread merges q right after the group read its members' state
        out = orig(self)
        if self.names[0] == "q_proj" and not threads:
            t = threading.Thread(target=q.merge)
            threads.append(t)
            t.start()
            deadline = time.monotonic() + 10  # until the merge is done, or waits for the group's locks
            while not (q._lock._writers_waiting or q.merged) and time.monotonic() < deadline:
                time.sleep(0.001)
        return out

    groups.ProjectionGroup.specs = specs
    try:
        with torch.no_grad():
            got = grouped(input_ids=ids).logits
    finally:
        groups.ProjectionGroup.specs = orig
        for t in threads:
            t.join(10)
    assert threads and q.merged
    # the forward saw q wholly unmerged (the merge waited): the adapter is in the result once
    torch.testing.assert_close(got, unmerged, rtol=1e-5, atol=1e-6)


class _InPlaceAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, h):
        q = self.q_proj(h)
        h.mul_(2.0)  # in place between the members
        return q[..., :8] * self.k_proj(h) + self.v_proj(h)


@pytest.mark.parametrize("ctx", [torch.inference_mode, torch.no_grad])
def test_in_place_change_between_members_of_a_hand_made_group(ctx):
    """An inference tensor has no version counter: a hand-made group steps aside for it (no stale
    output); with grad off (a version counter) the safety net catches the change."""
    torch.manual_seed(0)
    plain = _InPlaceAttn().eval()
    lk.inject(plain, lk.LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    _randomize(plain)
    grouped = copy.deepcopy(plain)
    groups.group_projections(grouped)
    x = torch.randn(2, 3, 16)
    with ctx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, got = plain(x.clone()), grouped(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_known_parents_stay_grouped_under_inference_mode():
    plain, grouped = _pair(0.0, layers=1)
    ids = tokens(batch=1, seq=5)
    with torch.inference_mode():
        expected = plain.eval()(input_ids=ids).logits
        before = _calls()
        got = grouped.eval()(input_ids=ids).logits
    assert _calls() - before == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _QOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, h):
        return self.q_proj(h)  # k and v never called


@pytest.mark.parametrize("in_except", [False, True])
def test_forward_inside_an_except_block_keeps_the_safety_net(in_except):
    """A forward that succeeds while the caller handles an unrelated exception is a success: outputs
    never asked for still switch the group off."""
    torch.manual_seed(0)
    model = _QOnly().train()
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"]))
    groups.group_projections(model)
    with pytest.warns(RuntimeWarning, match="never called"):
        if in_except:
            try:
                raise KeyError("unrelated, handled by the caller")
            except KeyError:
                model(torch.randn(2, 16))
        else:
            model(torch.randn(2, 16))
    assert lk.projection_groups(model)[0]["reason"].startswith("switched off")


def test_a_failing_forward_is_not_taken_for_unused_outputs():
    class Fails(_QOnly):
        def forward(self, h):
            self.q_proj(h)
            raise ValueError("boom")

    torch.manual_seed(0)
    model = Fails().train()
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    groups.group_projections(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="boom"):
            model(torch.randn(2, 16))
    assert lk.projection_groups(model)[0]["applies"]  # not switched off: the forward raised
    assert model.__dict__["_lk_projection_groups"][0]._live == {}  # its session was closed all the same


def test_peft_merge_and_unload_dissolves_the_stale_groups():
    """PEFT's own merge_and_unload swaps the members for plain layers: the groups (and the removed
    layers they held) go at the parent's next forward, or at projection_groups()."""
    import gc
    import weakref

    for trigger in ("forward", "projection_groups"):
        model = _peft_llama(0.0)
        lk.peft.convert(model)
        attn = model.base_model.model.model.layers[0].self_attn
        old = weakref.ref(attn.q_proj)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = model.merge_and_unload()
        attn = merged.model.layers[0].self_attn
        assert type(attn.q_proj) is nn.Linear
        if trigger == "forward":
            with torch.no_grad():
                merged(input_ids=tokens(batch=1, seq=4))
        else:
            assert lk.projection_groups(merged) == []
        gc.collect()
        assert old() is None
        for parent in (attn, merged.model.layers[0].mlp):
            assert "_lk_projection_groups" not in parent.__dict__
            assert not parent._forward_pre_hooks and not parent._forward_hooks

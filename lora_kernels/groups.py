"""Shared-input projection groups (issue 16, item 2), applied by ``inject`` and ``peft.convert``.

Several adapted projections that read the same tensor (Llama's q/k/v read the attention norm's
output, gate/up the MLP norm's) are computed by ONE op from one x:

    forward:   u_i = (x ⊙ Z_i)·A_iᵀ for every member i, y_i = x·W_iᵀ + b_i + s_i·u_i·B_iᵀ
    backward:  dx = Σ_i (g_i·W_i + s_i·(v_i·A_i) ⊙ Z_i), accumulated into one buffer instead of
               autograd summing one M×K tensor per member

Each member keeps its own dropout seed, drawn in member order exactly as the separate layers draw
theirs (one draw per member, only when p > 0 and training), so outputs and gradients equal the
ungrouped model's under the same torch RNG state.

How it is wired (nothing in the model's structure changes): the members keep their class; each
holds ``_lk_group = (group, index)`` in its ``__dict__`` (not a parameter, buffer or submodule, so
module names, parameter names and the state dict are unchanged), and the parent gets a forward
pre-hook that opens a per-thread *session*, a forward hook that closes it when the forward returned
and an always-called one that closes it when it raised. While the parent's forward runs, the first
member (index 0: q_proj / gate_proj) called with x computes every member's output, holding every
member's readers lock (LoRALinear) from reading their state to the end of the op; each later member
called with that same tensor object, unmodified (same ``_version``), takes its output from the
session's cache. An inference tensor has no version counter: only groups of :data:`KNOWN_PARENTS`
(whose forward changes nothing in place between the members) compute from one; hand-made groups
step aside. The cache never outlives the parent's forward (the closing hooks drop it, also on an
exception), so no autograd graph is kept alive past it. A group whose members are no longer the
parent's children (PEFT's own ``merge_and_unload``) dissolves itself at the parent's next forward.

When a group computes (docs/projection-groups.md has the user-facing version), all of:
- the parent's forward is running (called as a module), no forward-mode AD or functorch transform is
  active (while torch.compile traces, :meth:`ProjectionGroup.traced_output` is the route instead: a
  KNOWN_PARENTS group puts one grouped op in the graph; a hand-made group steps aside);
- every member: one active plain-LoRA adapter (not DoRA, not per-slice ``enable_lora``, not
  several active adapters nor an ``adapter_names=`` mixed batch, not merged, not disabled; PEFT
  layers also: no ``lora_bias``, no extra forward arguments), a plain floating-point frozen weight
  and bias (a weight or bias that requires grad while grad is enabled steps aside; with grad
  disabled the op gets them detached: no graph is recorded either way) — or no active
  adapter at all (a *passive* member: it computes its base output itself and draws no seed), as
  long as at least two members are active;
- all members have the same effective dropout probability (p if training else 0) and backend, and
  their weights the dtype and device of x (after autocast's casts).
Otherwise every member runs its own (ungrouped) path for that forward: same results, same RNG draws.

Safety net: if a member expected from the cache is called with another tensor (cross-attention),
members are served out of order, or the parent's forward ends with outputs never asked for, the
group's work was partly wasted (and its seed draws differ from the separate layers'): the group
switches itself off with a RuntimeWarning, the member computes only its own output, and the model
stays correct. ``inject``/``convert`` only group parents whose forward is known to call the members
in order on one tensor (:data:`KNOWN_PARENTS`), where this never happens.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch import nn

from .dropout import draw_seed, draw_seed_tensor
from .layers import LoRALinear, _compiling

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# transformers classes whose forward calls these children, in this order, on the same tensor, with no
# RNG draw between them (read in transformers 5.x: modeling_<family>.py). Matched by class name, for
# classes defined in a ``transformers.`` module; anything else is grouped only by an explicit
# group_projections(model).
_ATTENTION = ("Llama", "Mistral", "Ministral", "Mixtral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Moe", "Gemma",
              "Gemma2", "Gemma3", "Granite", "Olmo", "Olmo2", "Cohere", "Starcoder2", "SmolLM3")
_MLP = ("Llama", "Mistral", "Ministral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Moe", "Gemma", "Gemma2", "Gemma3",
        "Granite", "Olmo", "Olmo2", "Cohere", "SmolLM3")
KNOWN_PARENTS = {**{f"{f}Attention": DEFAULT_GROUPS[0] for f in _ATTENTION},
                 **{f"{f}MLP": DEFAULT_GROUPS[1] for f in _MLP}}

# counted by the tests: grouped ops run (one per group and forward when the group applies)
GROUP_CALLS = {"count": 0}

_ATTR = "_lk_group"              # on a member: (ProjectionGroup, index)
_PARENT_ATTR = "_lk_projection_groups"  # on a parent: [ProjectionGroup, ...]
_X_ATTR = "_lk_group_out"        # while torch.compile traces, on views of a parent's inputs: see traced_output


# ------------------------------------------------------------------------------------------------
# the math op


def _group_forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds, backend):
    """[y_i] (..., N_i): y_i = x·W_iᵀ + b_i + s_i·((x ⊙ Z_i)·A_iᵀ)·B_iᵀ, Z_i the mask of seeds[i]:
    :func:`lora_kernels.grouped.grouped_lora` (one grouped shrink launch on the Triton backends; it
    refuses what the separate layers' explicit backends refuse)."""
    from .grouped import grouped_lora

    return grouped_lora(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seeds, backend=backend)


# ------------------------------------------------------------------------------------------------
# members: what each kind of layer contributes, or why it cannot join this forward


class _Spec:
    __slots__ = ("weight", "bias", "a", "b", "scale", "p", "backend")

    def __init__(self, weight, bias, a, b, scale, p, backend):
        self.weight, self.bias, self.a, self.b, self.scale, self.p, self.backend = weight, bias, a, b, scale, p, backend


def _frozen_reason(weight, bias) -> str | None:
    """Why this base weight / bias cannot join, or None. A weight or bias that requires grad steps aside
    while grad is enabled (the group computes no weight gradient); with grad disabled (no_grad,
    inference_mode) no graph is recorded either way, and ``_run`` hands the op detached tensors."""
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
        return f"its weight is a {type(weight).__name__} of dtype {getattr(weight, 'dtype', None)} (quantized?)"
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "its base weight or bias trains (requires_grad)"
    return None


def _lora_spec(layer) -> _Spec | str | None:
    d = layer.__dict__
    if d.get("_lk_multi_rows") is not None or d.get("_lk_multi_active"):
        return "several adapters (adapter_names= mixed batch or several active)"
    if layer.merged:
        return f"adapter {layer.merged_adapter!r} is merged"
    if layer.disabled:
        return "adapters are disabled"
    if layer.active_adapter is None or layer.active_adapter not in layer.adapters:
        return None  # passive: computes its base output, draws nothing
    a = layer.active
    if a.use_dora:
        return f"adapter {layer.active_adapter!r} is DoRA"
    if a.enable_lora is not None:
        return f"adapter {layer.active_adapter!r} is per-slice (enable_lora)"
    reason = _frozen_reason(layer.weight, layer.bias)
    if reason is not None:
        return reason
    return _Spec(layer.weight, layer.bias, a.lora_A, a.lora_B, a.scale, a.dropout if layer.training else 0.0,
                 layer.backend)


def _peft_spec(layer) -> _Spec | str | None:
    from .peft.layers import _scale_args, dropout_p

    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "an adapter is merged"
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if not active:
        return None  # passive: computes its base output, draws nothing
    if len(active) > 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if layer.lora_variant.get(name) is not None:
        return f"adapter {name!r} is a PEFT variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
    if layer.lora_bias.get(name, False):
        return f"adapter {name!r} has lora_bias"
    try:
        p = dropout_p(layer.lora_dropout[name])
    except TypeError as exc:
        return str(exc)
    base = layer.get_base_layer()
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    reason = _frozen_reason(base.weight, base.bias)
    if reason is not None:
        return reason
    try:
        b, scale = _scale_args(layer.scaling[name], layer.lora_B[name].weight)
    except TypeError as exc:
        return str(exc)
    return _Spec(weight, base.bias, layer.lora_A[name].weight, b, scale, p if layer.training else 0.0, None)


def _member_kind(module) -> str | None:
    """'lora' (our LoRALinear), 'peft' (a converted PEFT lora.Linear) or None (cannot be a member)."""
    if type(module) is LoRALinear:
        return "lora"
    if type(module).__name__ == "Linear" and type(module).__module__ == "lora_kernels.peft.layers":
        return "peft"
    return None


def _draws_nothing(module) -> bool:
    """A child that may sit between members ungrouped: a plain torch Linear (no adapter, no RNG)."""
    return type(module) is nn.Linear


def _specs_reason(specs) -> str | None:
    specs = [s for s in specs if s is not None]
    if len(specs) < 2:
        return "fewer than two members have an active adapter"
    if len({s.p for s in specs}) != 1:
        return f"the members' dropout rates differ ({sorted({s.p for s in specs})})"
    if len({s.backend for s in specs}) != 1:
        return "the members' backends differ"
    return None


def _reason_for_x(x, specs, traced: bool = False) -> str | None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.numel() == 0:
        return "the input is not a non-empty floating-point tensor"
    if traced:  # (dynamo traces no forward-AD level nor functorch transform into a graph of these ops)
        return _specs_reason(specs)
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) >= 0 or torch._C._are_functorch_transforms_active():
        return "forward-mode AD or a functorch transform is active"
    return _specs_reason(specs)


# ------------------------------------------------------------------------------------------------
# the group


def _next_active(specs, i: int) -> int:
    """The first index ≥ i of a member that is not passive (len(specs) if none)."""
    while i < len(specs) and specs[i] is None:
        i += 1
    return i


class _Session:
    __slots__ = ("cache",)

    def __init__(self):
        self.cache = None  # [x, x._version or None, outputs, next index to serve, specs]


class ProjectionGroup:
    """Members of one parent that read the same input (see the module docstring)."""

    def __init__(self, parent_name: str, names: list[str], members: list[nn.Module], kind: str,
                 trusted: bool = False):
        self.parent_name = parent_name
        self.names = list(names)
        self.members = list(members)
        self.kind = kind
        # the parent is one of KNOWN_PARENTS (its forward calls the members on one tensor, never changed
        # in place): only such a group computes from an inference tensor, which has no version counter
        self.trusted = trusted
        self.stopped: str | None = None  # why the safety net switched the group off
        self._live: dict[int, _Session] = {}  # thread id -> the session of the parent's running forward

    def __getstate__(self):  # copies and pickles start without a running session
        state = self.__dict__.copy()
        state["_live"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("trusted", False)  # pickled before the attribute existed
        self.__dict__.update(state)

    def current(self, parent: nn.Module) -> bool:
        """Whether the members are still the parent's children under their names (PEFT's own
        ``merge_and_unload``, for one, swaps them for plain layers behind our back)."""
        children = parent._modules
        return all(children.get(n) is m for n, m in zip(self.names, self.members))

    @property
    def full_names(self) -> list[str]:
        return [f"{self.parent_name}.{n}" if self.parent_name else n for n in self.names]

    # -- sessions (the parent's hooks) --
    def begin(self) -> None:
        self._live[threading.get_ident()] = _Session()

    def end(self, failed: bool = False) -> None:
        """Close this thread's session (a no-op when already closed: on success the plain hook closes
        it, then the always-called one finds nothing)."""
        s = self._live.pop(threading.get_ident(), None)
        if s is not None and s.cache is not None and not failed:
            unused = [self.names[i] for i in range(s.cache[3], len(self.members)) if s.cache[4][i] is not None]
            self._stop(f"{unused} were computed by the group but never called in the parent's forward")

    def _stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
            warnings.warn(f"lora_kernels projection group {self.full_names}: {why}; the group is switched off "
                          "(each member computes its own output from now on; results stay correct)", RuntimeWarning,
                          stacklevel=4)

    # -- state --
    def _spec(self, member):
        return _lora_spec(member) if self.kind == "lora" else _peft_spec(member)

    def specs(self) -> list[_Spec | None] | str:
        """Every member's spec (None: passive, no active adapter in this layer: it computes its base
        output alone, drawing no seed), or the first reason one of them cannot join."""
        out = []
        for name, m in zip(self.names, self.members):
            s = self._spec(m)
            if isinstance(s, str):
                return f"{name}: {s}"
            out.append(s)
        return out

    def why_not(self) -> str | None:
        """None if the group computes its members' next forward (input-dependent conditions aside)."""
        if self.stopped is not None:
            return f"switched off: {self.stopped}"
        specs = self.specs()
        return specs if isinstance(specs, str) else _specs_reason(specs)

    # -- the member call --
    def output(self, index: int, x, args=(), kwargs=None):
        """Member ``index``'s output from the group, or None: the member runs its own path."""
        if self.stopped is not None or args or kwargs:
            return None
        s = self._live.get(threading.get_ident())
        if s is None:  # not inside the parent's forward
            return None
        c = s.cache
        if c is not None and c[4][index] is None:
            return None  # a passive member: its own base output, the group's cache untouched
        if c is not None:
            if index == c[3] and c[0] is x and (c[1] is None or c[1] == x._version):
                spec = self._spec(self.members[index])
                old = c[4][index]
                if not isinstance(spec, _Spec) or spec.a is not old.a or spec.p != old.p or spec.scale != old.scale:
                    s.cache = None  # the member changed (merged, adapter switched ...) since the group ran
                    self._stop(f"{self.names[index]} changed state between the group's run and its call")
                    return None
                y = c[2][index]
                c[2][index] = None
                c[3] = _next_active(c[4], index + 1)
                if c[3] == len(self.members):
                    s.cache = None
                return y
            s.cache = None
            if index > c[3] or c[0] is not x or (c[1] is not None and c[1] != x._version):
                self._stop(f"{self.names[index]} was called with another tensor than {self.names[0]} (or after an "
                           "in-place change of it), or out of order")
            else:
                self._stop(f"{self.names[index]} was called twice")
            return None
        if index != 0:
            return None  # only the first member starts the group; any other computes only its own output
        if isinstance(x, torch.Tensor) and x.is_inference() and not self.trusted:
            return None  # no version counter: an in-place change between members could not be seen
        with contextlib.ExitStack() as stack:
            # Every member's readers lock, in member order, BEFORE its state is read and until the op has
            # run: a merge / unmerge lands wholly before or after, as for the ungrouped forward. Writers
            # hold one layer's lock at a time and every group takes its locks in one order (a member
            # belongs to one group), so this cannot deadlock.
            if self.kind == "lora":
                for m in self.members:
                    stack.enter_context(m._reading())
            specs = self.specs()
            if isinstance(specs, str) or _reason_for_x(x, specs) is not None:
                return None
            return self._run(s, x, specs)

    def traced_output(self, index: int, x, args=(), kwargs=None):
        """While torch.compile traces: member ``index``'s output from the group, or None (its own op).

        What dynamo cannot trace (thread-locals, locks, version counters, warnings) is left out, and so
        is any mutation of an object that lives outside the traced forward (inside an activation
        checkpoint, dynamo refuses those: "HOP: Unsafe side effect"). Only a group of a
        :data:`KNOWN_PARENTS` parent computes (its forward calls the members in order on one tensor and
        changes nothing in place; hand-made groups step aside). The parent's pre-hook hands its forward
        views of its tensor inputs, each tagged ``_lk_group_out`` = ((group, None), ...): the traced
        session, on a tensor made inside the traced forward. The first member called with such a
        tensor records ONE ``grouped_lora_fwd`` in the graph and puts the outputs in its group's entry
        of the tag; each later member called with that tensor, in order, takes its output from there;
        the last one drops them, so nothing outlives the parent's forward. A member called with any
        other tensor (outside the parent's forward, say) computes alone. The seeds are drawn as tensors
        (``draw_seed_tensor``, in the graph), one per active member in member order, as the separate
        layers' compiled ops draw theirs."""
        if not self.trusted or self.stopped is not None or args or kwargs or not isinstance(x, torch.Tensor):
            return None
        tag = getattr(x, _X_ATTR, None)
        if tag is None:
            return None  # not an input of the parent's traced forward
        state, found = None, False
        for g, st in tag:
            if g is self:
                state, found = st, True
        if not found:
            return None
        if state is not None:
            if len(state) == 0:
                return None  # the group was served already
            specs, ys, nxt = state
            if specs[index] is None or index != nxt:  # passive (or, never from a known parent: out of order)
                return None
            nxt = _next_active(specs, index + 1)
            self._tag(x, tag, (specs, ys, nxt) if nxt < len(specs) else ())
            return ys[index]
        if index != 0:
            return None
        specs = self.specs()
        if isinstance(specs, str) or _reason_for_x(x, specs, traced=True) is not None:
            return None
        ys = self._compute(x, specs, traced=True)
        if ys is None:
            return None
        nxt = _next_active(specs, 1)
        self._tag(x, tag, (specs, ys, nxt) if nxt < len(specs) else ())
        return ys[0]

    def _tag(self, x, tag, state) -> None:
        setattr(x, _X_ATTR, tuple((g, state if g is self else st) for g, st in tag))

    def _run(self, session, x, specs):
        ys = self._compute(x, specs, traced=False)
        if ys is None:
            return None
        version = None if x.is_inference() else x._version
        nxt = _next_active(specs, 1)
        session.cache = [x, version, ys, nxt, specs] if nxt < len(specs) else None
        return ys[0]  # None for a passive first member: it computes its base output itself

    def _compute(self, x, specs, traced: bool):
        """Every member's output (None for a passive one), or None: the members run their own paths."""
        from .functional import _autocast
        from .functions import _autocast_off

        ws, bs, a_s, b_s = [], [], [], []
        xc = _autocast(x, None, None, None, None)[0]  # x cast once (autocast), not once per member
        grad = torch.is_grad_enabled()
        active = [sp for sp in specs if sp is not None]
        for sp in active:
            _, w, a, b, bias = _autocast(xc, sp.weight, sp.a, sp.b, sp.bias)  # xc: already cast, kept
            if w.dtype != xc.dtype or w.device != xc.device:
                return None  # the member's own path raises its clear error, or casts as PEFT does
            if not grad:  # a base weight that requires grad, under no_grad: nothing is recorded either way
                w = w.detach()
                bias = None if bias is None else bias.detach()
            ws.append(w)
            a_s.append(a if a.dtype == xc.dtype else a.to(xc.dtype))
            b_s.append(b if b.dtype == xc.dtype else b.to(xc.dtype))
            bs.append(None if bias is None else (bias if bias.dtype == xc.dtype else bias.to(xc.dtype)))
        p = active[0].p
        # member order, as the separate layers draw: ints in eager (their value, as draw_seed_tensor's),
        # tensors while tracing (a randint node in the graph, as the separate layers' compiled ops draw)
        draw = draw_seed_tensor if traced else draw_seed
        seeds = [draw() for _ in active] if p > 0.0 else [0] * len(active)
        if not traced:  # a traced count would be a constant replayed by every compiled call
            GROUP_CALLS["count"] += 1  # the members' readers locks are held by the caller (output)
        scales = [sp.scale for sp in active]
        if traced:  # inputs cast above; the op turns autocast off inside itself (torch 2.11's dynamo cannot
            ys = _group_forward(xc, ws, bs, a_s, b_s, scales, p, seeds, active[0].backend)  # trace _autocast_off)
        else:
            with _autocast_off(xc.device):
                ys = _group_forward(xc, ws, bs, a_s, b_s, scales, p, seeds, active[0].backend)
        outputs = iter(ys)
        return [None if sp is None else next(outputs) for sp in specs]


# ------------------------------------------------------------------------------------------------
# parents: hooks that open and close a session around the parent's forward


def _begin(module, args, kwargs=None):
    if _compiling():
        return _traced_inputs(module, args, kwargs)
    groups = module.__dict__.get(_PARENT_ATTR, ())
    if any(not g.current(module) for g in groups):
        groups = _prune(module)  # e.g. PEFT's own merge_and_unload replaced the members
    for g in groups:
        g.begin()


def _traced_inputs(module, args, kwargs):
    """While torch.compile traces a grouped parent: its floating-point tensor arguments replaced by
    views of themselves (same values, same gradients) made inside the traced forward, each tagged with
    the traced session of the parent's KNOWN_PARENTS groups (ProjectionGroup.traced_output). The
    members' shared x is then a tensor of the parent's own scope, so the group may keep its outputs on
    it even when the parent is called inside an activation checkpoint (dynamo refuses there any
    mutation of an object made outside it, the caller's tensor included), and a member called with
    any other tensor knows it is not inside the parent's forward."""
    session = tuple((g, None) for g in module.__dict__.get(_PARENT_ATTR, ()) if g.trusted)
    if not session:
        return None  # no group computes under compile: the inputs stay as they are

    def alias(v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return v
        v = v.view_as(v)
        setattr(v, _X_ATTR, session)
        return v

    args = tuple(alias(v) for v in args)
    if kwargs is None:  # registered without kwargs (a model pickled before they were passed)
        return args
    return args, {k: alias(v) for k, v in kwargs.items()}


def _done(module, args, output):
    """A plain forward hook: torch calls it only when the parent's forward returned."""
    if _compiling():
        return
    for g in module.__dict__.get(_PARENT_ATTR, ()):
        g.end(failed=False)


def _end(module, args, output):
    """The always-called hook: closes what ``_done`` did not (the forward raised). Whether it raised is
    not read from sys.exc_info(), which also holds an exception the CALLER is handling (a forward
    called inside an ``except`` block)."""
    if _compiling():
        return
    for g in module.__dict__.get(_PARENT_ATTR, ()):
        g.end(failed=True)


_HOOKS = (_begin, _done, _end)


def _attach(parent: nn.Module, group: ProjectionGroup) -> None:
    groups = parent.__dict__.get(_PARENT_ATTR)
    if groups is None:
        parent.__dict__[_PARENT_ATTR] = groups = []
        parent.register_forward_pre_hook(_begin, with_kwargs=True)
        parent.register_forward_hook(_done)  # registered first: runs before _end on success
        parent.register_forward_hook(_end, always_call=True)
    groups.append(group)
    for i, m in enumerate(group.members):
        m.__dict__[_ATTR] = (group, i)


def _release(g: ProjectionGroup) -> int:
    n = 0
    for m in g.members:
        if m.__dict__.get(_ATTR, (None,))[0] is g:
            del m.__dict__[_ATTR]
            n += 1
    return n


def _prune(parent: nn.Module) -> list:
    """Dissolve the groups of ``parent`` whose members are no longer its children; the groups left."""
    keep = [g for g in parent.__dict__.get(_PARENT_ATTR, ()) if g.current(parent)]
    if not keep:
        _detach(parent)
        return []
    for g in parent.__dict__[_PARENT_ATTR]:
        if g not in keep:
            _release(g)
    parent.__dict__[_PARENT_ATTR] = keep
    return keep


def _detach(parent: nn.Module) -> int:
    """Remove every group of ``parent``; returns the number of members released."""
    groups = parent.__dict__.pop(_PARENT_ATTR, None)
    if groups is None:
        return 0
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for key in [k for k, f in hooks.items() if any(f is h for h in _HOOKS)]:
            del hooks[key]
            parent._forward_hooks_always_called.pop(key, None)
            parent._forward_pre_hooks_with_kwargs.pop(key, None)
    return sum(_release(g) for g in groups)


def _members_of(parent: nn.Module, names) -> tuple[list[str], list[nn.Module], str] | None:
    """The children of ``parent`` among ``names`` that can be members (≥ 2 of one kind, the others
    plain Linear layers or absent), else None."""
    found, kinds = [], set()
    for n in names:
        child = parent._modules.get(n)
        if child is None:
            continue
        kind = _member_kind(child)
        if kind is not None:
            found.append((n, child))
            kinds.add(kind)
        elif not _draws_nothing(child):
            return None  # e.g. a QLoRA or unconverted PEFT layer between members: it draws its own seed
    if len(found) < 2 or len(kinds) != 1:
        return None
    members = [m for _, m in found]
    widths = {_in_features(m) for m in members}
    if len(widths) != 1:
        return None
    return [n for n, _ in found], members, kinds.pop()


def _in_features(layer) -> int:
    if isinstance(layer, LoRALinear):
        return layer.in_features
    w = layer.get_base_layer().weight
    return w.shape[0] if layer.fan_in_fan_out else w.shape[1]


def _is_known_parent(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in KNOWN_PARENTS and cls.__module__.startswith("transformers.")


def _apply(model: nn.Module, groups, known_only: bool, add: bool = True) -> list[ProjectionGroup]:
    """(Re)build the groups of every eligible parent; existing identical groups are kept, groups whose
    members changed are dissolved (and rebuilt only when ``add``)."""
    out = []
    for parent_name, parent in model.named_modules():
        if known_only:
            if not _is_known_parent(parent):
                continue
            candidates = [KNOWN_PARENTS[type(parent).__name__]]
        else:
            candidates = list(groups)
        wanted = []
        for names in candidates:
            found = _members_of(parent, names)
            if found is not None:
                wanted.append(found)
        existing = parent.__dict__.get(_PARENT_ATTR, [])
        if not wanted:
            if known_only and existing:  # the members changed (e.g. handed back to PEFT): no group left
                _detach(parent)
            continue
        if [(g.names, g.members) for g in existing] == [(n, m) for n, m, _ in wanted] and \
                all(m.__dict__.get(_ATTR, (None,))[0] is g for g in existing for m in g.members):
            out += existing
            continue
        if existing:
            _detach(parent)
        if not add:
            continue
        for names, members, kind in wanted:
            for m in members:  # a member grouped under another parent (shared module): leave it
                held = m.__dict__.get(_ATTR)
                if held is not None:
                    break
            else:
                g = ProjectionGroup(parent_name, names, members, kind, trusted=_is_known_parent(parent))
                _attach(parent, g)
                out.append(g)
    return out


def apply_default_groups(model: nn.Module) -> list[ProjectionGroup]:
    """What ``inject`` / ``convert`` run: group q/k/v and gate/up under the known parent classes."""
    return _apply(model, DEFAULT_GROUPS, known_only=True)


# ------------------------------------------------------------------------------------------------
# public API


def group_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[list[str]]:
    """Group the children named in ``groups`` (tuples of child names, in the order the parent's forward
    calls them on ONE tensor) under every module that has at least two of them as LoRA layers, whatever
    the parent's class (``inject`` / ``convert`` group only :data:`KNOWN_PARENTS`). Returns the groups
    (full member names), including those already in place. Members keep their class and state dict."""
    if isinstance(groups, (str, bytes)) or not all(isinstance(g, (tuple, list)) and len(g) >= 2 and
                                                   all(isinstance(n, str) for n in g) for g in groups):
        raise TypeError(f"groups must be a sequence of tuples of ≥ 2 child names, got {groups!r}")
    made = _apply(model, groups, known_only=False)
    if not made:
        raise ValueError(f"no module of {type(model).__name__} has two or more of {tuple(groups)} as LoRALinear "
                         "(or converted PEFT lora.Linear) children")
    return [g.full_names for g in made]


def ungroup_projections(model: nn.Module) -> int:
    """Remove every projection group from ``model``; returns the number of members released."""
    return sum(_detach(m) for m in model.modules())


def projection_groups(model: nn.Module) -> list[dict]:
    """The model's projection groups: ``{"members": [full names], "kind": "lora" | "peft",
    "applies": bool, "reason": why not (None when it applies)}``; "applies" is for a forward in the
    model's current state (train/eval, adapters, merge ...); input-dependent conditions (dtype,
    autocast, torch.compile, inference tensors) are in docs/projection-groups.md. Groups whose members
    are no longer their parent's children (replaced by PEFT's own ``merge_and_unload``) are dissolved
    here, as at the parent's next forward."""
    out = []
    for m in model.modules():
        groups = m.__dict__.get(_PARENT_ATTR, ())
        if any(not g.current(m) for g in groups):
            groups = _prune(m)  # members replaced behind our back (PEFT's merge_and_unload): dissolved
        for g in groups:
            why = g.why_not()
            out.append({"members": g.full_names, "kind": g.kind, "applies": why is None, "reason": why})
    return out


__all__ = ["DEFAULT_GROUPS", "GROUP_CALLS", "KNOWN_PARENTS", "ProjectionGroup", "apply_default_groups",
           "group_projections", "projection_groups", "ungroup_projections"]

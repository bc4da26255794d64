"""``multi_adapter_linear``: one linear layer, several adapters, one call.

Two ways of using several adapters (the row plans of :mod:`lora_kernels.multi.plan`):

- ``row_adapter=`` (mixed batch, PEFT's ``adapter_names=``): flattened row m goes through adapter
  ``row_adapter[m]``; −1 = the base layer only;
- ``active=`` (several active adapters, PEFT's ``set_adapter([...])``): every row goes through the
  listed adapters, applied in order (PEFT's semantics, see :mod:`lora_kernels.multi.reference`).

Two implementations, chosen in :func:`resolve_multi_backend` (one visible place):

- ``triton``: y = x·Wᵀ + b by cuBLAS (``F.linear``), then ONE segmented shrink launch and ONE
  segmented expand launch for all adapters and rows (``kernels/multi_shrink.py``,
  ``kernels/multi_expand.py``), over the cached stack of :mod:`lora_kernels.multi.store`. With
  gradients (LoRA adapters), the backward reuses the same two kernels for v = g·B and
  dx = g·W + s·(v·A) ⊙ Z and adds one launch each for dA and dB (``kernels/multi_grad.py``);
  deterministic (no atomics).
- ``torch``: the same math in differentiable torch ops, a few ops per adapter (gather, two thin
  matmuls, index_add). Gradients reach each adapter's own parameters; every row receives its
  updates in a fixed order, so results are deterministic. DoRA adapters train here.

``auto`` takes ``triton`` for CUDA inputs the kernels can serve, ``torch`` otherwise. An explicit
``triton`` / ``fused`` / ``hybrid`` backend that cannot serve the call (gradients through a DoRA
adapter, a DoRA adapter with active dropout, dtype, rank above 256, device) is an error naming why. The
multi-adapter kernels always add into a cuBLAS base output (what the single-adapter backends call
"hybrid"); there is no fused-GEMM variant, so the three names mean the same here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton_env import HAS_TRITON, is_interpreter
from ..backends import KERNEL_DTYPES, MAX_KERNEL_RANK, requested_backend
from ..dropout import draw_seed, dropout_mask, seed_halves
from ..dora import dora_weight_norm_torch
from .plan import active_adapters_plan, mixed_batch_plan
from .store import AdapterSpec, build_stack, cached_stack

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_obstacles(x, adapters, used, needs_grad, training, weight_grad=False) -> list[str]:
    why = []
    if needs_grad and any(adapters[i].use_dora for i in used):
        why.append("a gradient is needed through a DoRA adapter (the multi-adapter kernels' backward covers "
                   "LoRA adapters; DoRA trains on backend='torch')")
    if needs_grad and weight_grad:
        why.append("the frozen weight requires a gradient (the kernels' backward has no dW)")
    if training and any(adapters[i].use_dora and adapters[i].dropout > 0 for i in used):
        why.append("a DoRA adapter has active dropout (PEFT's formula needs a second product with W on the "
                   "dropped input; backend='torch' computes it)")
    if x.dtype not in KERNEL_DTYPES:
        why.append(f"dtype {x.dtype} has no kernel (supported: {KERNEL_DTYPES})")
    r_max = max((adapters[i].rank for i in used), default=0)
    if r_max > MAX_KERNEL_RANK:
        why.append(f"rank {r_max} > {MAX_KERNEL_RANK}")
    return why


def resolve_multi_backend(backend, x, adapters, used, needs_grad, training, weight_grad=False) -> str:
    """'torch' or 'triton' for this call (see the module docstring)."""
    requested = requested_backend(backend)
    if requested == "torch":
        return "torch"
    why = _kernel_obstacles(x, adapters, used, needs_grad, training, weight_grad)
    if requested == "auto":
        return "triton" if (x.device.type == "cuda" and HAS_TRITON and not why) else "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"backend={requested!r} needs Triton, which is not installed")
    if x.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"backend={requested!r} runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                         f"x is on {x.device}")
    if why:
        raise ValueError(f"backend={requested!r} cannot run this multi-adapter call: " + "; ".join(why))
    return "triton"


def _check_row_adapter(row_adapter, m, n):
    if not isinstance(row_adapter, torch.Tensor) or row_adapter.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"row_adapter must be an int32/int64 tensor, got {getattr(row_adapter, 'dtype', type(row_adapter))}")
    if row_adapter.numel() != m:
        raise ValueError(f"row_adapter must have one entry per row of x ({m} rows), got {row_adapter.numel()}")
    if m and (int(row_adapter.min()) < -1 or int(row_adapter.max()) >= n):
        raise ValueError(f"row_adapter entries must be -1 (no adapter) or in [0, {n}), got values in "
                         f"[{int(row_adapter.min())}, {int(row_adapter.max())}]")


def _check_active(active, n) -> list[int]:
    active = [int(i) for i in active]
    if any(i < 0 or i >= n for i in active) or len(set(active)) != len(active):
        raise ValueError(f"active must list distinct adapter indices in [0, {n}), got {active}")
    return active


def multi_adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         adapters: list[AdapterSpec], *, row_adapter: torch.Tensor | None = None,
                         active: list[int] | None = None, training: bool = False, seeds: list[int] | None = None,
                         backend: str | None = None, owner=None, weight_param: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """y (…, N) = base layer + the adapters per ``row_adapter`` (mixed batch) or ``active`` (in order).

    x: (…, K); weight: (N, K) with x's dtype; bias: (N,) or None. ``adapters``: AdapterSpec list
    (their tensors are cast to x's dtype). ``seeds``: one dropout seed per adapter (None: drawn from
    torch's CPU generator when dropout is active); adapter i's mask is the same as a single-adapter
    call with seed ``seeds[i]`` on the whole batch. ``owner``: a module to cache the stacked adapters
    on (the triton path restacks only when an adapter changed); without it the stack is built per call.
    """
    if (row_adapter is None) == (active is None):
        raise ValueError("pass exactly one of row_adapter (a mixed batch) or active (several active adapters)")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in _AUTOCAST_ELIGIBLE:
        # as autocast does for F.linear (and lora_linear): compute in the autocast dtype, autocast off inside
        dt = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return multi_adapter_linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), adapters,
                                        row_adapter=row_adapter, active=active, training=training, seeds=seeds,
                                        backend=backend, owner=owner, weight_param=weight_param)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    n = len(adapters)
    x2d = x.reshape(-1, x.shape[-1])
    m = x2d.shape[0]
    if row_adapter is not None:
        _check_row_adapter(row_adapter, m, n)
        row_adapter = row_adapter.reshape(-1).to(device=x.device, dtype=torch.int64)
        used = list(range(n))
    else:
        used = _check_active(active, n)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds must have one seed per adapter ({n}), got {len(seeds)}")
    dropout_on = training and any(adapters[i].dropout > 0 for i in used)
    if dropout_on and seeds is None:  # drawn in the order the adapters apply (PEFT draws its masks so)
        seeds = [0] * n
        for i in used:
            if adapters[i].dropout > 0:
                seeds[i] = draw_seed()
    params = [t for i in used for t in (adapters[i].lora_a, adapters[i].magnitude) if t is not None]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad) or any(t.requires_grad for t in params)
        or any(t.requires_grad for i in used for t in adapters[i].versioned))
    path = resolve_multi_backend(backend, x, adapters, used, needs_grad, training, weight.requires_grad)
    if path == "torch":
        y = _torch_path(x2d, weight, bias, adapters, row_adapter, active, training, seeds)
    elif needs_grad:
        y = _triton_train(x2d, weight, bias, adapters, row_adapter, active, dropout_on, seeds, owner, weight_param)
    else:
        y = _triton_path(x2d, weight, bias, adapters, row_adapter, active, dropout_on, seeds, owner, weight_param)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------
# torch path (differentiable)


def _adapter_update(x_rows, y_rows, rows, m, weight, bias, a: AdapterSpec, training, seed):
    """The amount adapter ``a`` adds to y at ``rows`` (x_rows = x[rows], y_rows = running y[rows])."""
    p = a.dropout if training else 0.0
    k = x_rows.shape[1]
    if p > 0:
        z = dropout_mask(seed, m, k, p, dtype=x_rows.dtype, device=x_rows.device)
        xd = x_rows * (z if rows is None else z.index_select(0, rows))
    else:
        xd = x_rows
    lora_a = a.lora_a.to(x_rows.dtype)
    lora_b = a.lora_b().to(x_rows.dtype)
    lora = (xd @ lora_a.t()) @ lora_b.t() * a.scale
    if not a.use_dora:
        return lora
    norm = dora_weight_norm_torch(weight, a.lora_a, a.lora_b(), a.scale).detach()
    c = (a.magnitude.to(norm.dtype) / norm).to(x_rows.dtype)
    if p > 0:
        base = xd @ weight.t()
    else:
        base = y_rows - bias if bias is not None else y_rows
    return (c - 1) * base + c * lora


def _torch_path(x2d, weight, bias, adapters, row_adapter, active, training, seeds):
    m = x2d.shape[0]
    y = F.linear(x2d, weight, bias)
    seed_of = (lambda i: 0) if seeds is None else (lambda i: int(seeds[i]))
    if active is not None:
        for i in active:
            y = y + _adapter_update(x2d, y, None, m, weight, bias, adapters[i], training, seed_of(i))
        return y
    present = torch.unique(row_adapter).tolist()
    for i in present:
        if i < 0:
            continue
        rows = (row_adapter == i).nonzero().flatten()
        upd = _adapter_update(x2d.index_select(0, rows), y.index_select(0, rows), rows, m, weight, bias,
                              adapters[i], training, seed_of(i))
        y = y.index_add(0, rows, upd.to(y.dtype))
    return y


# ------------------------------------------------------------------------------------------------
# triton path (inference)


def _seed_words(seeds, n, device) -> torch.Tensor:
    """The kernels' per-adapter seeds: n×2 int32 (lo, hi words of each seed, as
    :func:`lora_kernels.dropout.seed_halves` splits it), indexed by adapter. A tensor, not kernel
    arguments: seeds differ per adapter and per call, and none of them may recompile a kernel."""
    words = [seed_halves(int(s)) for s in (seeds if seeds is not None else [0] * n)]
    return torch.tensor(words, dtype=torch.int32, device=device).reshape(n, 2)


def _stack_and_plan(x2d, weight, adapters, row_adapter, active, owner, weight_param):
    """The stacked adapters (cached on ``owner`` when given) and the row plan of the kernels."""
    from ..kernels.multi_shrink import multi_block_m

    if owner is not None:
        stack = cached_stack(owner, adapters, weight, x2d.dtype, weight_param)
    else:
        stack = build_stack(adapters, weight, x2d.dtype)
    block_m = multi_block_m()
    if active is not None:
        return stack, active_adapters_plan(x2d.shape[0], active, block_m, x2d.device)
    return stack, mixed_batch_plan(row_adapter, len(adapters), block_m)


def _triton_path(x2d, weight, bias, adapters, row_adapter, active, dropout_on, seeds, owner, weight_param):
    from ..kernels.multi_expand import lora_multi_expand_fwd
    from ..kernels.multi_shrink import lora_multi_shrink_fwd

    with torch.no_grad():
        y = F.linear(x2d, weight, bias)
        if not adapters or (active is not None and not active) or x2d.shape[0] == 0:
            return y  # nothing to add (and no zero-sized grid to launch)
        stack, plan = _stack_and_plan(x2d, weight, adapters, row_adapter, active, owner, weight_param)
        used_dora = any(stack.use_dora[i] for i in active) if active is not None else any(stack.use_dora)
        seed_t = _seed_words(seeds, len(adapters), x2d.device)
        u = lora_multi_shrink_fwd(x2d, stack.a, plan, stack.ranks, seed_t, stack.threshold, stack.keep_scale,
                                  has_dropout=dropout_on)
        lora_multi_expand_fwd(y, u, stack.b, plan, stack.ranks, stack.scales, bias=bias,
                              dora_scale=stack.dora_scale if used_dora else None)
    return y


# ------------------------------------------------------------------------------------------------
# triton path with gradients (LoRA adapters): the same two kernels serve the backward's v = g·B
# (shrink over B's transpose) and dx = g·W + s·(v·A) ⊙ Z (expand over A's transpose, mask
# regenerated), plus one launch each for dA and dB (kernels/multi_grad.py). Deterministic.


class _MultiLoraKernelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, meta, *ab):
        from ..kernels.multi_expand import lora_multi_expand_fwd
        from ..kernels.multi_shrink import lora_multi_shrink_fwd

        stack, plan, seed_t, dropout_on = meta
        y = F.linear(x2d, weight, bias)
        u = lora_multi_shrink_fwd(x2d, stack.a, plan, stack.ranks, seed_t, stack.threshold, stack.keep_scale,
                                  has_dropout=dropout_on)
        lora_multi_expand_fwd(y, u, stack.b, plan, stack.ranks, stack.scales)
        ctx.save_for_backward(x2d, weight, u)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        ctx.ab_meta = [(t.dtype, t.shape) for t in ab]
        return y

    @staticmethod
    def backward(ctx, g):
        from ..kernels.multi_expand import lora_multi_expand_fwd
        from ..kernels.multi_grad import lora_multi_a_grad, lora_multi_b_grad
        from ..kernels.multi_shrink import lora_multi_shrink_fwd

        x2d, weight, u = ctx.saved_tensors
        stack, plan, seed_t, dropout_on = ctx.meta
        g = g.contiguous()
        n, r_max = stack.a.shape[0], stack.a.shape[1]
        drop = dict(seed_words=seed_t, threshold=stack.threshold, keep_scale=stack.keep_scale) if dropout_on else {}
        v = lora_multi_shrink_fwd(g, stack.b.transpose(1, 2), plan, stack.ranks, seed_t, stack.threshold,
                                  stack.keep_scale, has_dropout=False)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            lora_multi_expand_fwd(dx, v, stack.a.transpose(1, 2), plan, stack.ranks, stack.scales, **drop)
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        da = lora_multi_a_grad(v, x2d, plan, n, r_max, stack.scales, **drop)
        dbs = lora_multi_b_grad(g, u, plan, n, r_max, stack.scales)
        n_ab = len(ctx.ab_meta) // 2
        grads = []
        for i, (dtype, shape) in enumerate(ctx.ab_meta):
            if i < n_ab:
                grads.append(da[i, :shape[0]].to(dtype))
            else:
                grads.append(dbs[i - n_ab, :, :shape[1]].to(dtype))
        return (dx, None, db, None, *grads)


def _triton_train(x2d, weight, bias, adapters, row_adapter, active, dropout_on, seeds, owner, weight_param):
    bs = [a.lora_b() for a in adapters]
    stack, plan = _stack_and_plan(x2d, weight, adapters, row_adapter, active, owner, weight_param)
    seed_t = _seed_words(seeds, len(adapters), x2d.device)
    a_in = [a.lora_a.to(x2d.dtype) for a in adapters]
    b_in = [b.to(x2d.dtype) for b in bs]
    return _MultiLoraKernelFn.apply(x2d, weight, bias, (stack, plan, seed_t, dropout_on), *a_in, *b_in)

"""Record what a LoRA/DoRA forward+backward launches, without a GPU and without running anything.

The real launchers of :mod:`lora_kernels.triton_backend` run on ``meta`` tensors (shapes and strides,
no memory), so Llama-sized problems cost nothing. While they run:

- ``JITFunction.run`` is replaced: a Triton launch is recorded (kernel, bound arguments, launch
  options, grid) instead of compiled and launched;
- ``Autotuner.run`` is replaced: the candidates left by the kernel's own ``prune_configs_by`` are
  recorded (all of them with ``all_candidates``, else the first), each as one launch of a group;
- a ``TorchDispatchMode`` records every non-view, non-allocating aten op (``mm``, ``addmm``, ``sum``,
  ``mul``, casts...): each is one device launch on a GPU (cuBLAS or a PyTorch kernel).

Nothing here names a kernel or its parameters: whatever the launchers call is what gets recorded,
so the report follows kernel changes by itself. The only knob set from outside is the number of
programs a split launch aims for (``configs.target_programs``), which the launchers derive from
the GPU; it is set to two waves of the modeled GPU's SMs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Allocations and metadata ops: no device work.
_NOT_LAUNCHES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
                 "lift_fresh", "detach", "alias", "resize_", "set_")


@dataclass
class TensorArg:
    """A tensor argument of a launch, as the model sees it."""
    shape: tuple
    stride: tuple
    dtype: str
    element_size: int
    storage: int  # identity of the underlying storage (aliases share it)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    def as_dict(self) -> dict:
        return dict(shape=list(self.shape), stride=list(self.stride), dtype=self.dtype)


def tensor_arg(t: torch.Tensor) -> TensorArg:
    return TensorArg(tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""), t.element_size(),
                     t.untyped_storage()._cdata)


@dataclass
class Launch:
    """One device launch: a Triton kernel (kind 'triton') or an aten op (kind 'torch')."""
    kind: str
    name: str
    stage: str  # 'fwd' or 'bwd'
    order: int
    params: dict = field(default_factory=dict)  # name -> int/float/bool/str or TensorArg
    grid: tuple = ()
    num_warps: int | None = None
    num_stages: int | None = None
    group: int | None = None  # launches of one autotuned call share a group (one runs on a GPU)
    candidate: int | None = None
    candidates: int | None = None  # after pruning
    configs_declared: int | None = None  # before pruning
    tune_key: tuple | None = None  # the autotuner's cache key (a new key means a new tuning run)
    # for compilation (not serialised)
    fn: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def constexprs(self) -> dict:
        if self.fn is None:
            return {}
        names = [p.name for p in self.fn.params if p.is_constexpr]
        return {k: self.params[k] for k in names if k in self.params}

    def as_dict(self) -> dict:
        d = dict(kind=self.kind, name=self.name, stage=self.stage, order=self.order, grid=list(self.grid),
                 num_warps=self.num_warps, num_stages=self.num_stages, group=self.group, candidate=self.candidate,
                 candidates=self.candidates, configs_declared=self.configs_declared,
                 tune_key=[str(k) for k in self.tune_key] if self.tune_key is not None else None)
        d["params"] = {k: (v.as_dict() if isinstance(v, TensorArg) else v) for k, v in self.params.items()
                       if isinstance(v, (TensorArg, int, float, bool, str)) or v is None}
        return d


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return tensor_arg(v)
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


class Recorder(TorchDispatchMode):
    """Collects launches; ``stage`` labels what comes next ('fwd' / 'bwd')."""

    def __init__(self, all_candidates: bool = False):
        super().__init__()
        self.launches: list[Launch] = []
        self.stage = "fwd"
        self.all_candidates = all_candidates
        self._groups = 0
        self._group: tuple | None = None  # (group id, candidate, candidates, declared, key) while tuning
        self._inside_triton = 0

    # -- aten ops --------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not (func.is_view or name in _NOT_LAUNCHES or self._inside_triton):
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            params = {f"in{i}": tensor_arg(t) for i, t in enumerate(tensors)}
            params.update({f"out{i}": tensor_arg(t) for i, t in enumerate(outs)})
            for k, v in kwargs.items():
                if isinstance(v, (int, float, bool)):
                    params[k] = v
            params["inplace"] = bool(func._schema.is_mutable)
            self.launches.append(Launch("torch", str(func), self.stage, len(self.launches), params))
        return out

    # -- Triton ----------------------------------------------------------------------------------------
    def record_triton(self, fn, args, grid, kwargs):
        sig = fn.signature
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        for name, p in sig.parameters.items():
            if name not in bound and p.default is not p.empty:
                bound[name] = p.default
        grid_t = grid(bound) if callable(grid) else grid
        grid_t = tuple(int(g) for g in (grid_t if isinstance(grid_t, (tuple, list)) else (grid_t,)))
        gid, cand, ncand, declared, key = self._group or (None, None, None, None, None)
        opts = {k: v for k, v in kwargs.items() if k not in names}
        launch = Launch(
            "triton", fn.fn.__name__, self.stage, len(self.launches),
            params={k: _jsonable(v) for k, v in bound.items()}, grid=grid_t,
            num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3),
            group=gid, candidate=cand, candidates=ncand, configs_declared=declared, tune_key=key,
            fn=fn, args=tuple(args), kwargs=dict(kwargs),
        )
        self.launches.append(launch)

    def record_autotuned(self, tuner, args, kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        # the autotuner's cache key, built as Autotuner.run builds it
        all_args = {**tuner.nargs, **kwargs}
        named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
        key = [named[k] for k in tuner.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        pruned = tuner.prune_configs({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        chosen = pruned if self.all_candidates else pruned[:1]
        gid = self._groups
        self._groups += 1
        for i, cfg in enumerate(chosen):
            self._group = (gid, i, len(pruned), len(tuner.configs), tuple(key))
            try:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                self._group = None
        tuner.nargs = None


_ACTIVE: list[Recorder] = []


def _patched_jit_run(self, *args, grid, warmup, **kwargs):
    rec = _ACTIVE[-1]
    rec._inside_triton += 1
    try:
        rec.record_triton(self, args, grid, kwargs)
    finally:
        rec._inside_triton -= 1
    return None


def _patched_autotuner_run(self, *args, **kwargs):
    rec = _ACTIVE[-1]
    rec.record_autotuned(self, args, kwargs)
    return None


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_compilable():
    """Raise if Triton runs in its interpreter in this process (kernels would not be JITFunctions)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("lora-kernels inspect compiles kernels: it must run with TRITON_INTERPRET unset "
                           "(use lora_kernels.perf.run_inspection, which starts a clean process when needed)")
    from .. import triton_backend  # noqa: F401  (imports the kernels)

    for name, mod in list(sys.modules.items()):
        if name.startswith("lora_kernels.kernels"):
            for v in vars(mod).values():
                if type(v).__name__ == "InterpretedFunction":
                    raise RuntimeError(f"{name} was imported with Triton in interpreter mode in this process")


@contextlib.contextmanager
def recording(all_candidates: bool = False, target_programs: int = 264, autotune: bool | None = None):
    """Patch Triton's launch entry points and the launchers' GPU query; yield a :class:`Recorder`.

    The launchers use their fixed (default) configs unless ``autotune`` (default: ``all_candidates``)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    check_compilable()
    rec = Recorder(all_candidates)
    saved = [(JITFunction, "run", JITFunction.run), (Autotuner, "run", Autotuner.run)]
    JITFunction.run = _patched_jit_run
    Autotuner.run = _patched_autotuner_run
    # the launchers size split reductions from the GPU's SM count: model the target GPU
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("lora_kernels.kernels") and hasattr(mod, "target_programs"):
            saved.append((mod, "target_programs", mod.target_programs))
            mod.target_programs = lambda device, _n=target_programs: _n
    _ACTIVE.append(rec)
    try:
        tune = all_candidates if autotune is None else autotune
        with _env(LORA_KERNELS_AUTOTUNE="1" if tune else "0"), rec:
            yield rec
    finally:
        _ACTIVE.pop()
        for obj, attr, val in reversed(saved):
            setattr(obj, attr, val)


# -- the problems ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One layer's fwd+bwd: x (M×K) -> y (M×N), rank r, dropout p."""
    projection: str
    M: int
    K: int
    N: int
    r: int
    p: float
    dtype: str = "bfloat16"
    kind: str = "lora"  # or 'dora'
    bias: bool = False

    def as_dict(self) -> dict:
        return dict(projection=self.projection, M=self.M, K=self.K, N=self.N, r=self.r, p=self.p,
                    dtype=self.dtype, kind=self.kind, bias=self.bias)


@contextlib.contextmanager
def _modeled_cuda(sms: int, capability: int):
    """Answer torch.cuda's device queries for the modeled GPU while launchers run on fake CUDA tensors."""
    import types

    props = types.SimpleNamespace(name="modeled GPU", major=capability // 10, minor=capability % 10,
                                  multi_processor_count=sms, total_memory=141 * 10**9, L2_cache_size=50 * 2**20,
                                  warp_size=32, max_threads_per_multi_processor=2048,
                                  regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=228 * 1024,
                                  shared_memory_per_block_optin=227 * 1024)
    fakes = dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                 get_device_capability=lambda device=None: (props.major, props.minor),
                 get_device_properties=lambda device=None: props, get_device_name=lambda device=None: props.name)
    saved = {k: getattr(torch.cuda, k) for k in fakes}
    for k, v in fakes.items():
        setattr(torch.cuda, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)


def capture_problem(problem: Problem, path: str, all_candidates: bool = False,
                    target_programs: int = 264, autotune: bool | None = None, seed: int = 1234,
                    device: str = "auto", capability: int = 90) -> list[Launch]:
    """Run the real backend's forward and backward for ``problem``; return its launches.

    ``device``: 'cuda-fake' runs the launchers on fake CUDA tensors (torch's FakeTensorMode: shapes,
    strides and a CUDA device, no memory) with torch.cuda's device queries answered for the modeled
    GPU, so a launcher that picks a path by device sees what it would see on that GPU; 'meta' runs
    them on meta tensors; 'auto' tries 'cuda-fake' and falls back to 'meta' (the launches record which).
    """
    if device == "auto":
        try:
            return capture_problem(problem, path, all_candidates, target_programs, autotune, seed, "cuda-fake",
                                   capability)
        except Exception:  # noqa: BLE001 - any failure of the fake device: the plain meta capture
            return capture_problem(problem, path, all_candidates, target_programs, autotune, seed, "meta")
    if device not in ("cuda-fake", "meta"):
        raise ValueError(f"device: expected 'auto', 'cuda-fake' or 'meta', got {device!r}")
    from .. import triton_backend as tb

    fake = device == "cuda-fake"
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode, env = FakeTensorMode(), _modeled_cuda(target_programs // 2, capability)
    else:
        mode, env = contextlib.nullcontext(), contextlib.nullcontext()
    dt = getattr(torch, problem.dtype)
    M, K, N, r = problem.M, problem.K, problem.N, problem.r
    kw = dict(device="cuda" if fake else "meta", dtype=dt)
    import warnings

    with env, mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        x, w = torch.empty(M, K, **kw), torch.empty(N, K, **kw)
        a, b = torch.empty(r, K, **kw), torch.empty(N, r, **kw)
        bias = torch.empty(N, **kw) if problem.bias else None
        g = torch.empty(M, N, **kw)
        scale = 2.0
        with recording(all_candidates, target_programs, autotune) as rec:
            if problem.kind == "lora":
                rec.stage = "fwd"
                _, u = tb.lora_linear_fwd(x, w, bias, a, b, scale, problem.p, seed, path)
                rec.stage = "bwd"
                tb.lora_linear_bwd(g, x, w, a, b, u, scale, problem.p, seed, True, path)
            elif problem.kind == "dora":
                m = torch.empty(N, **kw)
                rec.stage = "fwd"
                _, u, h, norm = tb.dora_linear_fwd(x, w, bias, a, b, m, scale, problem.p, seed, path)
                rec.stage = "bwd"
                tb.dora_linear_bwd(g, x, w, a, b, m, u, h, norm, scale, problem.p, seed, True, path)
            else:
                raise ValueError(f"kind: expected 'lora' or 'dora', got {problem.kind!r}")
    for launch in rec.launches:
        launch.params["capture_device"] = device
    return rec.launches

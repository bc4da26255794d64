"""nn.Modules that swap into models: ``LoRALinear`` (nn.Linear, GPT-2 Conv1D, fused projections with
per-slice adapters) and ``LoRAEmbedding``; several named adapters per layer, one active at a time."""
from __future__ import annotations

import contextlib
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_dropout, check_rank
from .backends import requested_backend
from .dora import dora_weight_norm_torch
from .functional import dora_linear, lora_linear

INITS = ("kaiming", "gaussian")


def _is_pissa(init: str) -> bool:
    return init == "pissa" or (init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit())


def _rewrites_weight(init: str) -> bool:
    return init == "olora" or _is_pissa(init)


class _ReadWriteLock:
    """Many readers (forwards) or one writer (merge / unmerge) at a time; a waiting writer stops new
    readers from entering, so merges are not starved by a stream of forwards."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


MERGED_KEY = "lora_merged."  # state-dict key prefix: lora_merged.<adapter> (DoRA: the scale c; LoRA: empty)


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


class LoraAdapter(nn.Module):
    """One adapter's parameters and settings.

    ``lora_A``: (r·S, in) and ``lora_B``: (out_slice·S, r) where S is the number of adapted output
    slices (1 for a plain layer; e.g. 2 for GPT-2 c_attn with enable_lora=[True, False, True]).
    ``lora_magnitude`` (out,) for DoRA, else None.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, enable_lora: list[bool] | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.rank = check_rank(rank)
        self.alpha = _check_alpha(alpha)
        self.dropout = check_dropout(dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = bool(use_dora)
        self.scale = lora_scale(self.rank, self.alpha, self.use_rslora)
        self.enable_lora = list(enable_lora) if enable_lora is not None else None
        if self.enable_lora is not None:
            if out_features % len(self.enable_lora):
                raise ValueError(f"enable_lora has {len(self.enable_lora)} slices, which do not divide "
                                 f"out_features={out_features}")
            if self.use_dora:
                raise ValueError("enable_lora (per-slice adapters) cannot be combined with use_dora")
        slices = sum(self.enable_lora) if self.enable_lora else 1
        slice_out = out_features // len(self.enable_lora) if self.enable_lora else out_features
        if self.rank > min(in_features, slice_out):
            # Allowed (PEFT allows it too), but B·A cannot have rank above min(in, out): the extra
            # rank only costs memory and compute. Python shows this once per call site.
            warnings.warn(f"LoRA rank {self.rank} exceeds min(in_features={in_features}, out_features={slice_out}); "
                          "the update's rank is capped at the smaller one", UserWarning, stacklevel=3)
        self.lora_A = nn.Parameter(torch.empty(self.rank * slices, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(slice_out * slices, self.rank, dtype=dtype, device=device))
        self.lora_magnitude = None
        self.out_features = out_features
        self.init = "kaiming"  # how A, B were initialised (PiSSA/OLoRA: relative to a rewritten weight)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """A ~ kaiming-uniform(a=√5) (as nn.Linear) or N(0, 1/r²) ('gaussian', PEFT's); B = 0."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        nn.init.zeros_(self.lora_B)

    def full_b(self) -> torch.Tensor:
        """B as an (out × r·S) matrix: per-slice blocks on the diagonal, zeros elsewhere (differentiable;
        zero rows for disabled slices, so their outputs never change)."""
        if self.enable_lora is None:
            return self.lora_B
        slices = len(self.enable_lora)
        slice_out = self.out_features // slices
        enabled = sum(self.enable_lora)
        blocks, e = [], 0
        for on in self.enable_lora:
            row = [torch.zeros(slice_out, self.rank, dtype=self.lora_B.dtype, device=self.lora_B.device)
                   for _ in range(enabled)]
            if on:
                row[e] = self.lora_B[e * slice_out:(e + 1) * slice_out]
                e += 1
            blocks.append(torch.cat(row, dim=1))
        return torch.cat(blocks, dim=0)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A (out × in) in float32."""
        return self.scale * (self.full_b().detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        slices = f", enable_lora={self.enable_lora}" if self.enable_lora else ""
        return (f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"rslora={self.use_rslora}, dora={self.use_dora}{slices}")


class _AdapterHost(nn.Module):
    """Named adapters, the active one, disabling, merge bookkeeping."""

    def _init_host(self, backend):
        if backend is not None:
            requested_backend(backend)
        self.backend = backend
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self._lock = _ReadWriteLock()

    # The lock is runtime state: copies and pickles get a fresh one.
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = _ReadWriteLock()

    def _reading(self):
        """Held by forward: merge/unmerge wait until running forwards are done, and forwards wait
        while the weight is rewritten. Not taken while torch.compile traces (a graph has no locks)."""
        if _compiling():
            return contextlib.nullcontext()
        return self._lock.reading()

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    # The merged flag (and DoRA's merge scale) travel with the weights in the state dict, so a merged
    # model's state loads as merged, and an unmerged one as unmerged (issue 20, item 9).
    def _merged_scale(self):
        return getattr(self, "_merged_dora_scale", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            c = self._merged_scale()
            w = self.base_layer.weight
            value = c if c is not None else torch.zeros(0, dtype=torch.float32, device=w.device)
            destination[prefix + MERGED_KEY + self.merged_adapter] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged_keys = [k for k in state_dict if k.startswith(prefix + MERGED_KEY)]
        incoming = [k[len(prefix + MERGED_KEY):] for k in merged_keys]
        weight_key = prefix + "base_layer.weight"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in merged_keys:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        if weight_key not in state_dict:  # a partial state dict without the weight: the flag stays
            if merged_keys:
                error_msgs.append(f"{prefix[:-1]}: {merged_keys[0]} says the weight is merged, but {weight_key} "
                                  "is missing")
            return
        if len(incoming) > 1 or (incoming and incoming[0] not in self.adapters):
            error_msgs.append(f"{prefix[:-1]}: the state dict was saved with adapter {incoming} merged, which this "
                              f"layer does not have (adapters: {list(self.adapters)})")
            return
        with self._lock.writing():
            if incoming:
                c = state_dict[merged_keys[0]]
                self.active_adapter = incoming[0]
                self.merged_adapter = incoming[0]
                if hasattr(self, "_merged_dora_scale"):
                    self._merged_dora_scale = c.detach().to(torch.float32).clone() if c.numel() else None
            else:
                self.merged_adapter = None
                if hasattr(self, "_merged_dora_scale"):
                    self._merged_dora_scale = None

    @property
    def active(self) -> LoraAdapter:
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            raise RuntimeError(f"{type(self).__name__} has no active adapter (adapters: {list(self.adapters)})")
        return self.adapters[self.active_adapter]

    # the active adapter's parameters and settings, for the common single-adapter case
    @property
    def lora_A(self) -> nn.Parameter:
        return self.active.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.active.lora_B

    @property
    def lora_magnitude(self) -> nn.Parameter | None:
        return self.active.lora_magnitude

    @property
    def rank(self) -> int:
        return self.active.rank

    @property
    def alpha(self) -> float:
        return self.active.alpha

    @property
    def scale(self) -> float:
        return self.active.scale

    @property
    def dropout(self) -> float:
        return self.active.dropout

    @property
    def use_rslora(self) -> bool:
        return self.active.use_rslora

    @property
    def use_dora(self) -> bool:
        return self.active.use_dora

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter (instant: nothing is reloaded)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {list(self.adapters)}")
        if self.merged and name != self.merged_adapter:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the weight; unmerge() before "
                               f"switching to {name!r}")
        self.__dict__.pop("_lk_multi_active", None)  # one adapter again (lora_kernels.multi)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove ``name``. Deleting the active adapter is an error (set another one first)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {list(self.adapters)}")
        if name == self.active_adapter or name in self.__dict__.get("_lk_multi_active", ()):
            raise RuntimeError(f"adapter {name!r} is active; set_adapter() to another one before deleting it")
        del self.adapters[name]

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, merged={self.merged}, disabled={self.disabled}"


class LoRALinear(_AdapterHost):
    """A frozen linear layer plus trainable low-rank adapters: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ.

    The base layer (``base_layer``) is an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (weight
    stored in×out; the kernels read it through strides, nothing is copied). It is frozen. Adapters
    live in ``adapters[name]`` (:class:`LoraAdapter`); ``lora_A``/``lora_B``/``lora_magnitude``/
    ``scale``... read the active one. B starts at zero, so the output equals the base layer's at step 0.

    ``use_dora=True``: DoRA (PEFT's definition, see ``lora_kernels.dora_linear``), with a trainable
    magnitude initialised to the row norms of W (the output again equals the base layer's at step 0:
    exactly in fp32, within the rounding of m in lower precision).

    ``enable_lora``: for fused projections (GPT-2 c_attn = [q, k, v]), one bool per equal output
    slice; only enabled slices get a (rank-r) adapter, and all of them run in one kernel call as a
    rank r·S adapter whose B is block-diagonal over the slices (disabled slices' outputs never change).

    ``merge()`` folds the active adapter into the base weight (zero-overhead inference) and
    ``unmerge()`` takes it out again.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                 use_dora: bool = False, adapter_name: str = "default", enable_lora: list[bool] | None = None):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(f"base_layer must be an nn.Linear or a transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._init_host(backend)
        self.register_buffer("_merged_dora_scale", None, persistent=False)
        self.add_adapter(adapter_name, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                         use_dora=use_dora, enable_lora=enable_lora)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                    use_dora: bool = False, adapter_name: str = "default",
                    enable_lora: list[bool] | None = None) -> "LoRALinear":
        """Wrap ``linear`` (kept as ``base_layer``, its parameters frozen in place)."""
        return cls(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init, backend=backend,
                   use_dora=use_dora, adapter_name=adapter_name, enable_lora=enable_lora)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", use_dora: bool = False, enable_lora: list[bool] | None = None) -> None:
        """Add a new adapter and make it active (the first one, or when none is active)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if not isinstance(init, str) or not (init in INITS or _rewrites_weight(init)):
            raise ValueError(f"init must be one of {INITS + ('pissa', 'olora')} or 'pissa_niter_<N>', got {init!r}")
        if self.merged:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the weight; unmerge() before adding "
                               f"adapter {name!r} (a DoRA magnitude or PiSSA/OLoRA init would read the merged weight)")
        if _rewrites_weight(init) and len(self.adapters):
            raise ValueError(f"init={init!r} rewrites the frozen weight shared with adapters {list(self.adapters)}; "
                             "a PiSSA/OLoRA adapter must be the only one on its layer")
        if getattr(self, "_residual_adapter", None) is not None:
            owner, owner_init = self._residual_adapter
            raise ValueError(f"adapter {owner!r} (init={owner_init!r}) replaced the frozen weight by its residual, "
                             f"which would be shared: adapter {name!r} cannot be added to this layer")
        w = self.base_layer.weight
        adapter = LoraAdapter(self.in_features, self.out_features, rank, alpha, dropout, use_rslora, use_dora,
                              enable_lora, dtype=w.dtype, device=w.device)
        adapter.init = init
        if _rewrites_weight(init):
            adapter.reset_parameters("kaiming")
            self.adapters[name] = adapter
            try:
                self._pissa_init(adapter, init)
            except Exception:
                del self.adapters[name]
                raise
            self._residual_adapter = (name, init)
        else:
            adapter.reset_parameters(init)
            self.adapters[name] = adapter
        if use_dora:
            adapter.lora_magnitude = nn.Parameter(self._dora_norm(adapter).to(w.dtype))
        if self.active_adapter is None:
            self.active_adapter = name

    @torch.no_grad()
    def _pissa_init(self, adapter: LoraAdapter, init: str) -> None:
        """PiSSA (Meng et al., 2024): A, B from the top-r singular triplets of W (fp32), and the frozen
        weight replaced by the residual W − s·B·A, so the output is unchanged at step 0.
        OLoRA (Büyükakyüz, 2024; PEFT's definition): W = Q·R, A = R[:r], B = Q[:, :r], same residual."""
        if adapter.enable_lora is not None:
            raise ValueError(f"{init} init is not supported with enable_lora (per-slice adapters)")
        w = self.weight.detach().float()
        r = adapter.rank
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            adapter.lora_A.copy_(rr[:r].to(adapter.lora_A.dtype))
            adapter.lora_B.copy_(q[:, :r].to(adapter.lora_B.dtype))
            self.weight.copy_((w - adapter.delta_weight()).to(self.weight.dtype))
            return
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            niter = int(init.rsplit("_", 1)[1])
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.t()
        s = s / adapter.scale
        adapter.lora_A.copy_((torch.sqrt(s)[:, None] * vh).to(adapter.lora_A.dtype))
        adapter.lora_B.copy_((u * torch.sqrt(s)[None, :]).to(adapter.lora_B.dtype))
        self.weight.copy_((w - adapter.delta_weight()).to(self.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight as (out, in): a transposed view for Conv1D (no copy)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.fan_in_fan_out else w.shape[0]

    def _dora_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        return dora_weight_norm_torch(self.weight, adapter.lora_A, adapter.full_b(), adapter.scale)

    @torch.no_grad()
    def dora_weight_norm(self) -> torch.Tensor:
        """n_j = ‖W_j + s·(B·A)_j‖ of the active adapter, in fp32, never building W + s·B·A."""
        return self._dora_norm(self.active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_lk_group")  # lora_kernels.groups
        if group is not None:
            y = group[0].traced_output(group[1], x) if _compiling() else group[0].output(group[1], x)
            if y is not None:
                return y
        with self._reading():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("_lk_multi_rows") is not None or self.__dict__.get("_lk_multi_active"):
            from .multi.glue import multi_forward  # several adapters: adapter_names= or several active
            return multi_forward(self, x)
        if self.merged:  # the adapter is already inside the weight
            if self.disabled:
                raise RuntimeError("adapters are disabled but one is merged into the weight; unmerge() first")
            return F.linear(x, self.weight, self.bias)
        if self.disabled or self.active_adapter is None:
            return F.linear(x, self.weight, self.bias)
        a = self.active
        if a.use_dora:
            return dora_linear(x, self.weight, a.lora_A, a.lora_B, a.lora_magnitude, a.scale, bias=self.bias,
                               dropout_p=a.dropout, training=self.training, backend=self.backend)
        return lora_linear(x, self.weight, a.lora_A, a.full_b(), a.scale, bias=self.bias,
                           dropout_p=a.dropout, training=self.training, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A of the active adapter, (out × in) in float32."""
        return self.active.delta_weight()

    def merge(self, safe: bool = False) -> None:
        """W ← W + s·B·A (DoRA: W ← c ⊙ (W + s·B·A), c = m/n), in float32, cast back to W's dtype.

        ``safe``: compute the merged weight aside and refuse (nothing written) if it has NaN/inf.
        """
        if self.merged:
            raise RuntimeError(f"LoRALinear.merge(): adapter {self.merged_adapter!r} is already merged; "
                               "call unmerge() first")
        with torch.no_grad(), self._lock.writing():
            a = self.active
            w = self.weight
            merged = w.float() + a.delta_weight()
            c = None
            if a.use_dora:
                c = a.lora_magnitude.detach().float() / self._dora_norm(a).float()
                if not torch.all(torch.isfinite(c)) or torch.any(c == 0):
                    raise RuntimeError("LoRALinear.merge(): the DoRA scale m/n has zero or non-finite entries; "
                                       "merging would not be reversible")
                merged.mul_(c[:, None])
            merged = merged.to(w.dtype)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"safe merge: merging adapter {self.active_adapter!r} would put NaN/inf into "
                                 "the weight; nothing was written")
            w.copy_(merged)
            self._merged_dora_scale = c
            self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (restores W within the rounding of its dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        with self._lock.writing():
            a = self.adapters[self.merged_adapter]
            w = self.weight
            restored = w.float()
            if self._merged_dora_scale is not None:
                restored.div_(self._merged_dora_scale.to(restored.device)[:, None])
            w.copy_((restored - a.delta_weight()).to(w.dtype))
            self._merged_dora_scale = None
            self.merged_adapter = None

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}({self.in_features}→{self.out_features}), " + super().extra_repr()


class LoRAEmbedding(_AdapterHost):
    """A frozen ``nn.Embedding`` plus low-rank adapters: y = E[ids] + s·(A[:, ids])ᵀ·Bᵀ.

    PEFT's layout: A (r × num_embeddings), B (embedding_dim × r); A starts at zero and B random
    (so the output equals the base at step 0). Plain torch ops (a gather, then an r-wide matmul):
    there is no dense GEMM to fuse into. No dropout (PEFT applies none to embeddings). No DoRA.
    """

    def __init__(self, base_layer: nn.Embedding, rank: int, alpha: float, use_rslora: bool = False,
                 backend: str | None = None, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be an nn.Embedding, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._init_host(backend)
        self.add_adapter(adapter_name, rank, alpha, use_rslora=use_rslora)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", use_dora: bool = False, enable_lora=None) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if use_dora or enable_lora is not None or init != "kaiming":
            raise ValueError("LoRAEmbedding supports plain LoRA only (no DoRA, enable_lora or PiSSA)")
        w = self.base_layer.weight
        # stored like LoRALinear's adapters: lora_A (r × num_embeddings), lora_B (dim × r)
        adapter = LoraAdapter(w.shape[0], w.shape[1], rank, alpha, 0.0, use_rslora, False, None,
                              dtype=w.dtype, device=w.device)
        with torch.no_grad():
            nn.init.zeros_(adapter.lora_A)
            nn.init.normal_(adapter.lora_B)
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _embed(self, ids, weight):
        b = self.base_layer
        return F.embedding(ids, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with self._reading():
            return self._forward(ids)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("_lk_multi_rows") is not None or self.__dict__.get("_lk_multi_active"):
            from .multi.glue import multi_forward  # several adapters: adapter_names= or several active
            return multi_forward(self, ids)
        out = self._embed(ids, self.base_layer.weight)
        if self.merged or self.disabled or self.active_adapter is None:
            if self.merged and self.disabled:
                raise RuntimeError("adapters are disabled but one is merged into the weight; unmerge() first")
            return out
        a = self.active
        return out + (self._embed(ids, a.lora_A.t()) @ a.lora_B.t()) * a.scale

    def delta_weight(self) -> torch.Tensor:
        """s·(B·A)ᵀ (num_embeddings × dim) in float32."""
        return self.active.delta_weight().t()

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        if self.merged:
            raise RuntimeError(f"LoRAEmbedding.merge(): adapter {self.merged_adapter!r} is already merged")
        w = self.base_layer.weight
        merged = (w.float() + self.delta_weight()).to(w.dtype)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"safe merge: merging adapter {self.active_adapter!r} would put NaN/inf into the "
                             "weight; nothing was written")
        with self._lock.writing():
            w.copy_(merged)
            self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRAEmbedding.unmerge(): the adapter is not merged")
        with self._lock.writing():
            w = self.base_layer.weight
            w.copy_((w.float() - self.adapters[self.merged_adapter].delta_weight().t()).to(w.dtype))
            self.merged_adapter = None


LORA_LAYERS = (LoRALinear, LoRAEmbedding)

"""Whole-model training steps side by side with PEFT: ``lora-kernels bench --model NAME``.

A Llama-style model is built from a ``transformers.LlamaConfig`` (random weights, nothing is
downloaded) and LoRA (or DoRA) is put on all seven linear projections (q, k, v, o, gate, up, down)
with LLaMA-Factory's usual settings (r 16, α 32, dropout 0.05 or 0). Then a few full training steps
(forward, backward, AdamW step) are run by these engines, one after the other, in one process:

    peft       PEFT: ``get_peft_model`` (its own LoRA/DoRA layers)
    inject     ``lora_kernels.inject`` on the same base weights (q/k/v and gate/up as shared-input
               projection groups: the default, :mod:`lora_kernels.groups`)
    convert    ``lora_kernels.peft.convert`` of a PEFT model (PEFT's modules, our kernels; grouped too)
    ungrouped  ``inject`` with ``group_projections=False``: every projection alone (what the groups save)

All start from the same adapter weights (PEFT's init, copied into the others) and see the same batch
every step. Before step i the torch generator is seeded with ``seed + i``, so our engines draw the
same dropout seeds: their losses must be equal at any dropout, and all must agree with PEFT at
dropout 0 (PEFT's nn.Dropout masks differ from ours; equal only in distribution).

Figures per run: tokens/s of each timed step (after warm-up: median, min, max), the loss of every
step, memory, and the agreement checks. Memory on CUDA: ``torch.cuda.max_memory_allocated`` during the
timed steps. On CPU: the exact bytes saved for backward by one forward (every distinct storage the
autograd graph keeps that is not a parameter, from ``torch.autograd.graph.saved_tensors_hooks``), by
category, and the process RSS peak sampled during the steps. With gradient checkpointing the saved
bytes are not reported: the checkpointed blocks save through torch's own hooks.

Presets: ``tiny`` (CPU: hidden 512, 2 layers, 512 tokens, fp32), ``1b`` (Llama-3.2-1B shapes,
16 layers, 2×2048 tokens, bf16) and ``llama3-8b-layers`` (4 Llama-3-8B layers, 4096 tokens, bf16).
CPU timings say nothing about GPU speed: they are labelled as CPU timings everywhere.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINES = ("peft", "inject", "convert", "ungrouped")
DEFAULT_ENGINES = ("peft", "inject", "convert", "ungrouped")
OURS = ("inject", "convert", "ungrouped")
CPU_NOTE = "CPU timings: they say nothing about GPU speed"
# Relative tolerance of the loss agreement checks, by dtype (a few AdamW steps amplify rounding).
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    note: str
    gpu_only: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def llama_config(self, seq: int | None = None):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(seq or self.seq, self.seq), use_cache=False, attention_dropout=0.0,
            tie_word_embeddings=False)


PRESETS = {
    "tiny": ModelPreset("tiny", 512, 1376, 2, 8, 8, 1024, 1, 512, "CPU-sized Llama (2 layers)"),
    "1b": ModelPreset("1b", 2048, 8192, 16, 32, 8, 128256, 2, 2048, "Llama-3.2-1B shapes", gpu_only=True),
    "llama3-8b-layers": ModelPreset("llama3-8b-layers", 4096, 14336, 4, 32, 8, 128256, 1, 4096,
                                    "4 layers of Llama-3-8B (full vocabulary)", gpu_only=True),
}


@dataclass(frozen=True)
class RunSpec:
    kind: str  # lora | dora
    dropout: float
    checkpointing: bool

    @property
    def label(self) -> str:
        return f"{'LoRA' if self.kind == 'lora' else 'DoRA'} p={self.dropout:g}" + \
            (" GC" if self.checkpointing else "")


def default_specs(device: str) -> list[RunSpec]:
    """GPU: every combination of kind (LoRA, DoRA), p (0.05, 0) and checkpointing (off, on). CPU (kept
    small so that ``tiny`` runs in under 3 minutes on two cores): LoRA at p 0.05 and 0, LoRA at p 0.05
    with checkpointing, DoRA at p 0 (where all three engines must agree); ask for the rest with
    ``--kinds lora,dora`` (and ``--checkpointing off,on`` in ``python -m lora_kernels.benchmarks.model``)."""
    if device == "cuda":
        return [RunSpec(k, p, gc_) for k in ("lora", "dora") for gc_ in (False, True) for p in (0.05, 0.0)]
    return [RunSpec("lora", 0.05, False), RunSpec("lora", 0.0, False), RunSpec("lora", 0.05, True),
            RunSpec("dora", 0.0, False)]


@dataclass
class Result:
    """One engine on one RunSpec."""
    spec: dict
    engine: str
    losses: list = field(default_factory=list)
    step_s: list = field(default_factory=list)  # timed steps only
    tokens: int = 0
    saved_bytes: int | None = None
    saved_by_category: dict = field(default_factory=dict)
    peak_bytes: int | None = None  # CUDA max_memory_allocated, or the sampled process RSS peak on CPU
    base_bytes: int | None = None  # CUDA memory_allocated, or RSS, before the timed steps
    trainable: int = 0
    converted: int | None = None
    skipped: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    error: str | None = None

    def tokens_per_s(self) -> list[float]:
        return [self.tokens / t for t in self.step_s if t > 0]

    def median_tps(self) -> float:
        tps = self.tokens_per_s()
        return statistics.median(tps) if tps else float("nan")


# --------------------------------------------------------------------------------- saved-for-backward


def _category(path: str, t: torch.Tensor, proj_inputs: dict, ranks: set) -> str:
    parts = path.split(".")
    proj = next((i for i, p in enumerate(parts) if p in PROJECTIONS), None)
    if proj is not None:
        # nn.Dropout keeps its mask: bool (CUDA's fused dropout) or in x's dtype (CPU: x·noise saves noise)
        if t.dtype == torch.bool or any("dropout" in p for p in parts[proj:]):
            return "dropout masks"
        key = ".".join(parts[: proj + 1])
        x_ptr, x_shape = proj_inputs.get(key, (None, None))
        if t.untyped_storage().data_ptr() == x_ptr:
            return "projection inputs x"
        if t.numel() == 1 and not t.dtype.is_floating_point:
            return "dropout seeds"
        if t.dim() and t.shape[-1] in ranks:
            return "LoRA u = x·Aᵀ (M×r)"
        if "lora_A" in parts[proj:] and x_shape is not None and t.numel() == x_shape.numel():
            return "masked input copies x⊙Z (M×K)"  # PEFT: lora_A's input is nn.Dropout's output
        return "other adapter tensors (DoRA: h, norms)"
    if t.dtype == torch.bool:
        return "other masks"
    if "self_attn" in parts:
        return "attention (RoPE, SDPA)"
    if "mlp" in parts:
        return "MLP (SiLU, product)"
    if any("norm" in p for p in parts):
        return "RMSNorm"
    if any("embed" in p for p in parts):
        return "embedding"
    return "LM head, loss, other"


class _Held:
    """What the graph stores instead of a saved tensor while counting: the tensor and its category.
    When the graph drops it (a branch whose output is not used), the handle dies with it."""
    __slots__ = ("tensor", "category", "__weakref__")

    def __init__(self, tensor, category):
        self.tensor, self.category = tensor, category


class SavedTensorCounter:
    """Counts, for one forward, every distinct storage saved for backward that is not a parameter and
    that the autograd graph still holds when the forward ends, attributed to the innermost module
    running when it was first saved. The graph holds small handles (:class:`_Held`) instead of the
    tensors; a handle dies when the graph drops it, so storages freed during the forward are not
    counted (nor confused with a later tensor at the same address)."""

    def __init__(self, model: nn.Module, ranks: set):
        self.model, self.ranks = model, ranks
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int]] = {}
        self.stack: list[str] = []
        self.proj_inputs: dict[str, tuple] = {}
        self._held: list = []
        self._handles = []

    def __enter__(self):
        import weakref

        names = {m: n for n, m in self.model.named_modules()}

        def pre(mod, args):
            name = names.get(mod)
            if name is not None:
                self.stack.append(name)
                if name.split(".")[-1] in PROJECTIONS and args and isinstance(args[0], torch.Tensor):
                    self.proj_inputs[name] = (args[0].untyped_storage().data_ptr(), args[0].shape)

        def post(mod, args, out):
            if names.get(mod) is not None and self.stack:
                self.stack.pop()

        def pack(t):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or \
                    t.untyped_storage().data_ptr() in self.params:
                return t
            # detached (same storage, no grad_fn): a saved output would otherwise hold its own node
            # through the handle, a reference cycle that keeps dropped branches alive
            held = _Held(t.detach(), _category(self.stack[-1] if self.stack else "", t, self.proj_inputs,
                                               self.ranks))
            self._held.append(weakref.ref(held))
            return held

        def unpack(h):
            return h.tensor if isinstance(h, _Held) else h

        self._handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                         nn.modules.module.register_module_forward_hook(post)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        for ref in self._held:  # what the graph still holds, in saving order; each storage once
            held = ref()
            if held is not None:
                st = held.tensor.untyped_storage()
                self.seen.setdefault(st.data_ptr(), (held.category, st.nbytes()))
        self._held = []

    @property
    def total(self) -> int:
        return sum(n for _, n in self.seen.values())

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cat, n in self.seen.values():
            out[cat] = out.get(cat, 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class RssSampler:
    """The process's resident set size, sampled every ``interval`` seconds in a thread (CPU peak)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap memory back to the OS so the next RSS figure starts low (glibc only)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# ----------------------------------------------------------------------------------------- engines


def peft_config(spec: RunSpec, rank: int, alpha: float):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=list(PROJECTIONS),
                           use_dora=spec.kind == "dora", bias="none", task_type="CAUSAL_LM")


def make_peft(base: nn.Module, spec: RunSpec, rank: int, alpha: float) -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft_config(spec, rank, alpha), autocast_adapter_dtype=False)


def peft_adapter_weights(peft_model: nn.Module) -> dict[str, tuple]:
    """{module name without PEFT's prefix: (A, B, magnitude or None)} cloned, for copying elsewhere."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            mag = m.lora_magnitude_vector["default"].weight if "default" in m.lora_magnitude_vector else None
            out[name.removeprefix("base_model.model.")] = (
                m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                None if mag is None else mag.detach().clone())
    return out


@torch.no_grad()
def copy_into_peft(peft_model: nn.Module, weights: dict) -> int:
    from peft.tuners.lora import LoraLayer

    n = 0
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            a, b, mag = weights[name.removeprefix("base_model.model.")]
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)
            if mag is not None:
                m.lora_magnitude_vector["default"].weight.copy_(mag)
            n += 1
    return n


@torch.no_grad()
def copy_into_ours(model: nn.Module, weights: dict) -> int:
    from ..model import lora_layers

    layers = lora_layers(model)
    if set(layers) != set(weights):
        raise RuntimeError(f"adapted modules differ: ours {sorted(layers)[:3]}..., PEFT {sorted(weights)[:3]}...")
    for name, layer in layers.items():
        a, b, mag = weights[name]
        ad = layer.adapters["default"]
        ad.lora_A.copy_(a)
        ad.lora_B.copy_(b)
        if mag is not None:
            ad.lora_magnitude.copy_(mag)
    return len(layers)


def build_engine(engine: str, base: nn.Module, spec: RunSpec, rank: int, alpha: float, weights: dict | None):
    """(model, info) for ``engine``, adapters set from ``weights`` (PEFT's init) when given."""
    info: dict = {}
    if engine in ("inject", "ungrouped"):
        from .. import LoraConfig, inject

        model = copy.deepcopy(base)
        inject(model, LoraConfig(rank=rank, alpha=alpha, dropout=spec.dropout, target_modules=list(PROJECTIONS),
                                 use_dora=spec.kind == "dora", group_projections=engine == "inject"))
        if weights is not None:
            copy_into_ours(model, weights)
    else:
        model = make_peft(base, spec, rank, alpha)
        if weights is not None:
            copy_into_peft(model, weights)
        if engine == "convert":
            from ..peft import convert

            converted, skipped = convert(model)
            info = {"converted": len(converted), "skipped": skipped}
    if spec.checkpointing:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), info


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int, warmup: int, seed: int, lr: float,
                device: str, count_saved: bool, ranks: set) -> Result:
    """``steps`` full training steps on one batch (labels = ids); the first ``warmup`` are not timed.
    The first step's forward is the one whose saved tensors are counted (when ``count_saved``)."""
    res = Result(spec={}, engine="", tokens=ids.numel())
    params = [p for p in model.parameters() if p.requires_grad]
    res.trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr)
    sampler = None
    for i in range(steps):
        if i == warmup:  # timed steps start: reset the memory figures
            _release_memory(device)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                res.base_bytes = torch.cuda.memory_allocated()
            else:
                sampler = RssSampler().__enter__()
                res.base_bytes = sampler.start
        torch.manual_seed(seed + i)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if i == 0 and count_saved:
            with SavedTensorCounter(model, ranks) as counter:
                loss = model(input_ids=ids, labels=ids).loss
            res.saved_bytes, res.saved_by_category = counter.total, counter.by_category()
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res.losses.append(float(loss.detach()))
        if i >= warmup:
            res.step_s.append(dt)
    if device == "cuda":
        res.peak_bytes = torch.cuda.max_memory_allocated()
    elif sampler is not None:
        sampler.__exit__(None, None, None)
        res.peak_bytes = sampler.peak
    return res


def _rel_diff(a: list, b: list) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=float("nan"))


def add_checks(results: list[Result], dtype: str) -> bool:
    """Loss agreement of one RunSpec's engines (stored in each ours' ``checks``); True if all pass."""
    by = {r.engine: r for r in results if r.error is None and r.losses}
    tol = LOSS_RTOL[dtype]
    ok = True
    p = results[0].spec["dropout"] if results else 0.0
    pairs = [("inject", "convert"), ("ungrouped", "inject")] + \
        ([("inject", "peft"), ("convert", "peft"), ("ungrouped", "peft")] if p == 0 else [])
    for x, y in pairs:
        if x in by and y in by:
            d = _rel_diff(by[x].losses, by[y].losses)
            passed = d <= tol
            by[x].checks[f"loss vs {y}"] = {"max_rel_diff": d, "tol": tol, "ok": passed}
            ok &= passed
    return ok


# ---------------------------------------------------------------------------------------- the run


def make_base(preset: ModelPreset, dtype: torch.dtype, device: str, seq: int, seed: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs: a 1B model's fp32 init on the CPU takes long
        model = transformers.LlamaForCausalLM(preset.llama_config(seq))
    return model.to(dtype=dtype)


def run_model_bench(preset: ModelPreset, specs: list[RunSpec], *, engines=DEFAULT_ENGINES, device: str = "cpu",
                    dtype: str | None = None, rank: int = 16, alpha: float = 32.0, seq: int | None = None,
                    batch: int | None = None, steps: int | None = None, warmup: int | None = None,
                    lr: float = 1e-3, seed: int = 0, budget_s: float | None = None, log=print) -> tuple[list, dict]:
    """Run every spec with every engine; return (results, meta). Exceptions of one engine are recorded
    in its Result (``error``), the others still run."""
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    tdtype = getattr(torch, dtype)
    seq, batch = seq or preset.seq, batch or preset.batch
    warmup = warmup if warmup is not None else (3 if device == "cuda" else 1)
    steps = steps if steps is not None else (10 if device == "cuda" else 3)
    total_steps = warmup + steps
    t_start = time.time()
    base = make_base(preset, tdtype, device, seq, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, preset.vocab, (batch, seq), generator=g).to(device)
    results, verdicts = [], {}
    for spec in specs:
        if budget_s is not None and time.time() - t_start > budget_s:
            log(f"# budget of {budget_s:g} s reached: {spec.label} and later runs not started")
            break
        spec_results, weights = [], None
        init = make_peft(base, spec, rank, alpha)
        weights = peft_adapter_weights(init)
        del init
        for engine in engines:
            t0 = time.time()
            res = Result(spec=asdict(spec), engine=engine, tokens=batch * seq)
            try:
                model, info = build_engine(engine, base, spec, rank, alpha, weights)
                out = train_steps(model, ids, total_steps, warmup, seed=seed + 100, lr=lr, device=device,
                                  count_saved=not spec.checkpointing,
                                  ranks={rank, 2 * rank, 3 * rank})  # a group saves its members' u side by side
                out.spec, out.engine = asdict(spec), engine
                out.converted, out.skipped = info.get("converted"), info.get("skipped", {})
                res = out
                del model
            except Exception as exc:  # recorded, shown in the table; the other engines still run
                res.error = f"{type(exc).__name__}: {exc}"
            _release_memory(device)
            spec_results.append(res)
            log(f"# {spec.label:<16} {engine:<8} {time.time() - t0:6.1f} s"
                + (f"  ERROR {res.error}" if res.error else f"  losses {' '.join(f'{v:.5f}' for v in res.losses)}"))
        verdicts[spec.label] = add_checks(spec_results, dtype)
        results += spec_results
    from .env import env_info

    meta = env_info(device)
    meta.update(preset=asdict(preset), dtype=dtype, rank=rank, alpha=alpha, seq=seq, batch=batch, tokens=batch * seq,
                warmup_steps=warmup, timed_steps=steps, lr=lr, seed=seed, engines=list(engines),
                targets=list(PROJECTIONS), loss_checks=verdicts, elapsed_s=round(time.time() - t_start, 1))
    return results, meta


def saved_ratio(results: list[Result], engine: str = "inject", kind: str = "lora", dropout: float = 0.05):
    """Saved-for-backward bytes of ``engine`` over PEFT's (no checkpointing), or None."""
    def find(e):
        return next((r for r in results if r.engine == e and r.spec["kind"] == kind and r.spec["dropout"] == dropout
                     and not r.spec["checkpointing"] and r.saved_bytes), None)
    ours, peft_ = find(engine), find("peft")
    return ours.saved_bytes / peft_.saved_bytes if ours and peft_ else None


# -------------------------------------------------------------------------------------------- CLI


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _specs_from(kinds, dropouts, checkpointing, device) -> list[RunSpec]:
    if kinds is None and dropouts is None and checkpointing is None:
        return default_specs(device)
    kinds = kinds or ["lora"]
    dropouts = dropouts if dropouts is not None else [0.05, 0.0]
    checkpointing = checkpointing if checkpointing is not None else [False]
    for k in kinds:
        if k not in ("lora", "dora"):
            raise ValueError(f"kinds: {k!r} is not one of lora, dora")
    for p in dropouts:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropouts: {p!r} is not in [0, 1)")
    return [RunSpec(k, p, c) for k in kinds for c in checkpointing for p in dropouts]


def run(*, model: str, device: str | None = None, out: str | None = "bench_out", kinds=None, dropouts=None,
        checkpointing=None, engines=None, dtype: str | None = None, rank: int = 16, seq: int | None = None,
        steps: int | None = None, warmup: int | None = None, budget: float | None = None, plots: bool = True,
        allow_large_on_cpu: bool = False, argv=None) -> int:
    """The command: run, print the tables and the ratio, write JSON/markdown/plot. Exit code 0, 1 when a
    loss check fails or an engine errors, 2 for bad arguments."""
    from . import model_report as report

    try:
        if model not in PRESETS:
            raise ValueError(f"--model: {model!r} is not one of {', '.join(PRESETS)}")
        preset = PRESETS[model]
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if preset.gpu_only and device != "cuda" and not allow_large_on_cpu:
            raise ValueError(f"--model {model} ({preset.note}) is far too large for a CPU; use --model tiny, "
                             "or --allow-large-on-cpu")
        engines = engines or list(DEFAULT_ENGINES)
        for e in engines:
            if e not in ENGINES:
                raise ValueError(f"engines: {e!r} is not one of {', '.join(ENGINES)}")
        if dtype is not None and dtype not in LOSS_RTOL:
            raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(LOSS_RTOL)}")
        specs = _specs_from(kinds, dropouts, checkpointing, device)
    except ValueError as exc:
        print(f"lora-kernels bench --model: {exc}", file=sys.stderr)
        return 2
    print(f"# model {preset.name}: {preset.note}; {len(specs)} runs x {len(engines)} engines "
          f"({', '.join(engines)}) on {device}" + (f" — {CPU_NOTE}" if device != "cuda" else ""))
    results, meta = run_model_bench(preset, specs, engines=engines, device=device, dtype=dtype, rank=rank,
                                    seq=seq, steps=steps, warmup=warmup, budget_s=budget,
                                    log=lambda s: print(s, flush=True))
    meta["argv"] = list(argv) if argv is not None else None
    print(report.summary_text(results, meta))
    files = report.write_all(results, meta, out, plots=plots) if out else []
    if files:
        print("# wrote " + ", ".join(files))
    failed = [label for label, ok in meta["loss_checks"].items() if not ok]
    errors = [r for r in results if r.error]
    return 1 if failed or errors else 0


def run_from_bench_args(args) -> int:
    """``lora-kernels bench --model NAME``: the bench options that mean something for a model run are
    passed on (--device --out --kinds --dropouts --providers as engines --dtypes --ranks --tokens as
    sequence length --reps as timed steps --budget --no-plots --allow-large-on-cpu); the layer-only
    ones (--projections --modes --preset --quick --saved-bytes-only --details --quant --time-interpreter
    --no-model --compile-backend --no-progress) are refused, never silently dropped. Checkpointing and warm-up: ``python -m lora_kernels.benchmarks.model``."""
    layer_only = {"--projections": args.projections, "--modes": args.modes, "--preset": args.preset,
                  "--quick": args.quick or None, "--saved-bytes-only": args.saved_bytes_only or None,
                  "--details": args.details or None, "--quant": args.quant,
                  "--time-interpreter": args.time_interpreter or None, "--no-model": args.no_model or None,
                  "--compile-backend": args.compile_backend, "--no-progress": args.no_progress or None}
    given = [k for k, v in layer_only.items() if v]
    if given:
        print(f"lora-kernels bench --model: {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the "
              "layer bench only", file=sys.stderr)
        return 2
    try:
        dtypes = _csv(args.dtypes)
        ranks = [int(r) for r in _csv(args.ranks)] if args.ranks else [16]
        tokens = [int(t) for t in _csv(args.tokens)] if args.tokens else [None]
        dropouts = [float(p) for p in _csv(args.dropouts)] if args.dropouts else None
    except ValueError as exc:
        print(f"lora-kernels bench --model: {exc}", file=sys.stderr)
        return 2
    if len(ranks) > 1 or len(tokens) > 1 or (dtypes and len(dtypes) > 1):
        print("lora-kernels bench --model: give one value for --ranks, --tokens and --dtypes", file=sys.stderr)
        return 2
    kinds = [k.lower() for k in _csv(args.kinds)] if args.kinds else None
    return run(model=args.model, device=args.device, out=args.out, kinds=kinds, dropouts=dropouts,
               engines=_csv(args.providers), dtype=dtypes[0] if dtypes else None, rank=ranks[0], seq=tokens[0],
               steps=args.reps, budget=args.budget, plots=not args.no_plots,
               allow_large_on_cpu=args.allow_large_on_cpu, argv=getattr(args, "argv", None))


def _positive_seconds(text: str) -> float:
    from ..cli import positive_seconds

    return positive_seconds(text)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m lora_kernels.benchmarks.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--kinds", default=None, help="lora, dora or lora,dora")
    p.add_argument("--dropouts", default=None, help="comma-separated dropout rates (default 0.05,0)")
    p.add_argument("--checkpointing", default=None, help="off, on or off,on (default: off)")
    p.add_argument("--engines", default=None, help=f"comma-separated subset of {','.join(ENGINES)} "
                                                     f"(default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--budget", type=_positive_seconds, default=None,
                   help="seconds > 0: start no new run after this (default: none)")
    p.add_argument("--out", default="bench_out", help="output folder (default ./bench_out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-large-on-cpu", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = None
        if args.checkpointing:
            ckpt = []
            for v in _csv(args.checkpointing):
                if v not in ("off", "on"):
                    raise ValueError(f"--checkpointing: {v!r} is not off or on")
                ckpt.append(v == "on")
        dropouts = [float(p) for p in _csv(args.dropouts)] if args.dropouts else None
    except ValueError as exc:
        print(f"lora_kernels.benchmarks.model: {exc}", file=sys.stderr)
        return 2
    return run(model=args.model, device=args.device, out=args.out, kinds=_csv(args.kinds), dropouts=dropouts,
               checkpointing=ckpt, engines=_csv(args.engines), dtype=args.dtype, rank=args.rank, seq=args.seq,
               steps=args.steps, warmup=args.warmup, budget=args.budget, plots=not args.no_plots,
               allow_large_on_cpu=args.allow_large_on_cpu, argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

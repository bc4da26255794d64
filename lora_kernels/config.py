"""``LoraConfig``: what to adapt and how (validated on construction)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

from ._patterns import compile_safe, matches

INITS = ("kaiming", "gaussian", "pissa", "olora")  # plus "pissa_niter_<N>"
# inits that rewrite the frozen weight (W ← W − s·B0·A0): the layer must hold no other adapter
RESIDUAL_INITS = ("pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")

# Default targets per Hugging Face model family (config.model_type): the attention q and v
# projections, as in the LoRA paper. GPT-2's q, k, v live in one fused c_attn: q and v slices only.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
DEFAULT_ENABLE_LORA = {"gpt2": {"c_attn": [True, False, True]}}


def _check_pissa(init: str) -> bool:
    return init == "pissa" or re.fullmatch(r"pissa_niter_[0-9]+", init) is not None


def rewrites_weight(init: str) -> bool:
    """PiSSA and OLoRA replace the frozen weight by a residual."""
    return init == "olora" or _check_pissa(init)


def _check_alpha_value(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value) if not isinstance(value, numbers.Integral) else value


def _check_pattern(name: str, pattern, check_value, source):
    """{module-name pattern: value} with every key compiled under the bounded-time rules."""
    where = f" in {source}" if source else ""
    if not isinstance(pattern, dict):
        raise TypeError(f"{name}{where} must be a dict {{module-name pattern: value}}, got {type(pattern).__name__}")
    compiled = {}
    for key, value in pattern.items():
        compiled[key] = compile_safe(key, f"{name} key", source)
        try:
            check_value(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}[{key!r}]{where}: {exc}") from None
    return compiled


@dataclass
class LoraConfig:
    """LoRA / DoRA settings for :func:`lora_kernels.inject`.

    Args:
        rank: r (default 8). alpha: α (default 2·rank). dropout: p on the adapter input.
        target_modules: module names (a module matches when its full name equals one or ends with
            ``"." + name``), a regex string (full match on the module name), ``"all-linear"`` (every
            Linear / Conv1D but the output layer), or None for the model family's default.
        exclude_modules: same forms, removed from the targets.
        use_rslora: s = α/√r instead of α/r. use_dora: DoRA instead of LoRA.
        init: "kaiming" | "gaussian" | "pissa" | "pissa_niter_<N>" | "olora" (PiSSA and OLoRA rewrite
            the frozen weight: such an adapter must be the only one on its layers).
        bias: "none" | "all" | "lora_only": which biases train.
        rank_pattern / alpha_pattern: {module-name pattern: value} overrides; as in PEFT a pattern
            matches the whole module name or a dotted suffix of it, literally or as a regex; the first
            match wins. Regexes must fit a bounded-time subset (see ``lora_kernels._patterns``).
            Ranks are ints ≥ 1, alphas finite numbers > 0.
        enable_lora: {module name: [bool per output slice]} for fused projections (GPT-2 c_attn
            [q, k, v]); only enabled slices get an adapter, all computed in one kernel call.
        group_projections: after injecting, group the adapted q/k/v and gate/up projections of known
            Llama-style attention and MLP classes into shared-input projection groups (one op per
            group; same results: docs/projection-groups.md). False leaves the model ungrouped.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    enable_lora: dict[str, list[bool]] | None = None
    group_projections: bool = True
    source: str | None = field(default=None, repr=False, compare=False)  # the file it came from (errors name it)

    def __post_init__(self):
        from ._validation import check_dropout, check_rank

        self.rank = check_rank(self.rank)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise TypeError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        self.dropout = check_dropout(self.dropout)
        if not isinstance(self.init, str) or not (self.init in INITS or _check_pissa(self.init)):
            raise ValueError(f"init must be one of {INITS} or 'pissa_niter_<N>', got {self.init!r}")
        for name in ("use_rslora", "use_dora", "group_projections"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must be a string, a list of strings or None, got {value!r}")
                setattr(self, name, list(value))
            elif isinstance(value, str) and value != "all-linear":
                compile_safe(value, name, self.source)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        self._rank_re = _check_pattern("rank_pattern", self.rank_pattern, check_rank, self.source)
        self._alpha_re = _check_pattern("alpha_pattern", self.alpha_pattern,
                                        lambda v: _check_alpha_value(v, "alpha"), self.source)
        if self.enable_lora is not None:
            def check_mask(mask):
                if not isinstance(mask, (list, tuple)) or not mask or not all(isinstance(b, bool) for b in mask) \
                        or not any(mask):
                    raise ValueError(f"must be a non-empty list of bools with at least one True, got {mask!r}")
            self._enable_re = _check_pattern("enable_lora", self.enable_lora, check_mask, self.source)
            self.enable_lora = {k: list(v) for k, v in self.enable_lora.items()}
            if self.use_dora:
                raise ValueError("enable_lora (per-slice adapters) cannot be combined with use_dora")

    # -- per-module settings ------------------------------------------------------------------
    @staticmethod
    def _pattern_value(pattern: dict, compiled: dict, module_name: str, default):
        # PEFT's rule: the pattern matches the whole name or a dotted suffix of it (literally or as a
        # regex, see lora_kernels._patterns); the first matching key wins
        for key, value in pattern.items():
            if matches(module_name, key, compiled.get(key)):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        return int(self._pattern_value(self.rank_pattern, self._rank_re, module_name, self.rank))

    def alpha_for(self, module_name: str) -> float:
        return float(self._pattern_value(self.alpha_pattern, self._alpha_re, module_name, self.alpha))

    def enable_lora_for(self, module_name: str) -> list[bool] | None:
        if not self.enable_lora:
            return None
        return self._pattern_value(self.enable_lora, self._enable_re, module_name, None)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

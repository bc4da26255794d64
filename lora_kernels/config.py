"""``LoraConfig``: what to adapt and how (validated on construction)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

INITS = ("kaiming", "gaussian", "pissa")  # plus "pissa_niter_<N>"
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
        init: "kaiming" | "gaussian" | "pissa" | "pissa_niter_<N>" (PiSSA rewrites the frozen weight).
        bias: "none" | "all" | "lora_only": which biases train.
        rank_pattern / alpha_pattern: {module-name regex: value} overrides; as in PEFT a pattern
            matches the whole module name or a dotted suffix of it; the first match wins.
        enable_lora: {module name: [bool per output slice]} for fused projections (GPT-2 c_attn
            [q, k, v]); only enabled slices get an adapter, all computed in one kernel call.
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

    def __post_init__(self):
        from ._validation import check_dropout, check_rank

        self.rank = check_rank(self.rank)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise TypeError(f"alpha must be a finite number, got {self.alpha!r}")
        self.dropout = check_dropout(self.dropout)
        if not isinstance(self.init, str) or not (self.init in ("kaiming", "gaussian") or _check_pissa(self.init)):
            raise ValueError(f"init must be one of {INITS} or 'pissa_niter_<N>', got {self.init!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must be a string, a list of strings or None, got {value!r}")
                setattr(self, name, list(value))
        for key, value in self.rank_pattern.items():
            check_rank(value)
        if self.enable_lora is not None:
            for key, mask in self.enable_lora.items():
                if not mask or not all(isinstance(b, bool) for b in mask) or not any(mask):
                    raise ValueError(f"enable_lora[{key!r}] must be a non-empty list of bools with at least one "
                                     f"True, got {mask!r}")
            if self.use_dora:
                raise ValueError("enable_lora (per-slice adapters) cannot be combined with use_dora")

    # -- per-module settings ------------------------------------------------------------------
    def _pattern_value(self, pattern: dict, module_name: str, default):
        # PEFT's rule: the pattern matches the whole name or a dotted suffix of it
        for key, value in pattern.items():
            if module_name == key or module_name.endswith("." + key) or re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        return int(self._pattern_value(self.rank_pattern, module_name, self.rank))

    def alpha_for(self, module_name: str) -> float:
        return float(self._pattern_value(self.alpha_pattern, module_name, self.alpha))

    def enable_lora_for(self, module_name: str) -> list[bool] | None:
        if not self.enable_lora:
            return None
        return self._pattern_value(self.enable_lora, module_name, None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

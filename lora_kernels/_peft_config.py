"""Reading PEFT's ``adapter_config.json`` (peft 0.21's LoraConfig) as hostile input: every key is
honoured, ignored because it cannot change the numbers, or refused by name. docs/guarantees.md
lists the three sets; keep them in sync."""
from __future__ import annotations

import math
import numbers

# Keys whose value is applied when loading.
HONOURED = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern",
            "init_lora_weights")

# Keys that cannot change what a loaded adapter computes: bookkeeping, which modules to target (the
# saved weights name them), parallel layout, and settings used only while initialising or training
# (they describe how the saved A and B were obtained, not how they are used).
HARMLESS = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "fan_in_fan_out", "layers_to_transform",
    "layers_pattern", "megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying",
    "eva_config", "corda_config", "lora_ga_config", "loftq_config", "qalora_group_size",
    # VeLoRA compresses what PEFT's backward saves (an approximate gradient); the forward is LoRA's,
    # and lora_kernels' gradients are exact.
    "velora_config",
)

# Keys that change the maths when set to anything but their default: refused, with the reason.
REFUSED = {
    "alora_invocation_tokens": "aLoRA applies the adapter only from the invocation tokens on (a per-token "
                               "mask lora_kernels does not compute)",
    "use_qalora": "QALoRA pools the adapter's input in groups (GPTQ models only)",
    "lora_bias": "lora_bias adds a trained bias to lora_B, which lora_kernels' layers do not have",
    "layer_replication": "layer_replication duplicates layers of the base model",
    "modules_to_save": "modules_to_save stores whole trained modules, which load_adapter does not restore",
    "trainable_token_indices": "trainable_token_indices stores trained embedding rows, which load_adapter does "
                               "not restore",
    "target_parameters": "target_parameters adapts bare nn.Parameters (e.g. MoE experts), not modules",
    "monteclora_config": "MonteCLoRA samples the adapter at each forward",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes each token among several adapters",
    "kasa_config": "KaSA truncates the base weight and inserts a trained diagonal between A and B",
}

# init_lora_weights values: how the saved A, B relate to the frozen weight.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the base weight is untouched
RESIDUAL_INITS = {"pissa": "pissa", "olora": "olora"}  # redone deterministically at load (as PEFT does)
REFUSED_INITS = {
    "pissa_niter_": "its randomized SVD cannot be redone at load time (PEFT's own reload draws a different "
                    "residual weight)",
    "corda": "CorDA's residual weight depends on activation statistics that are not saved",
    "loftq": "LoftQ quantizes the base weight",
    "lora_ga": "LoRA-GA's residual weight depends on gradients that are not saved",
    "mica": "MiCA freezes lora_B, a training rule lora_kernels does not apply",
}


def _is_default(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str, tuple)) and len(value) == 0)


def _number(cfg, key, default, path, integer=False):
    value = cfg.get(key, default)
    if value is None:
        value = default
    wrong_kind = integer and not isinstance(value, numbers.Integral)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or wrong_kind:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{path}: {key} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{path}: {key} must be finite, got {value!r}")
    return value


def _flag(cfg, key, path) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def read_peft_config(cfg: dict, path: str) -> dict:
    """LoraConfig keyword arguments from PEFT's config dict, or ValueError naming the key and ``path``."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: expected a LoRA adapter config (peft_type 'LORA'), got {cfg.get('peft_type')!r}")
    for key, value in cfg.items():
        if key in HONOURED or key in HARMLESS:
            continue
        if key in REFUSED:
            if not _is_default(value):
                raise ValueError(f"{path}: {key}={value!r} is not supported: {REFUSED[key]}")
            continue
        if not _is_default(value):
            raise ValueError(f"{path}: unknown key {key!r} (= {value!r}); lora_kernels cannot tell whether it changes "
                             "what the adapter computes, so it refuses the file. Remove the key if it is harmless")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in RESIDUAL_INITS:
        init = RESIDUAL_INITS[init.lower()]
    elif init in PLAIN_INITS or init is None:
        init = "kaiming"
    else:
        reason = next((why for prefix, why in REFUSED_INITS.items()
                       if isinstance(init, str) and init.lower().startswith(prefix)), None)
        if reason is None:
            reason = "unknown initialisation; lora_kernels cannot tell whether it rewrote the base weight"
        raise ValueError(f"{path}: init_lora_weights={init!r} is not supported: {reason}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{path}: {key} must be a JSON object {{pattern: value}}, got {value!r}")
    bias = cfg.get("bias", "none")
    return dict(
        rank=_number(cfg, "r", 8, path, integer=True), alpha=_number(cfg, "lora_alpha", 8, path),
        dropout=_number(cfg, "lora_dropout", 0.0, path), use_rslora=_flag(cfg, "use_rslora", path),
        use_dora=_flag(cfg, "use_dora", path), bias="none" if bias is None else bias,
        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        init=init,
    )

"""The layer bench's whole-model figure: bytes saved for backward by one training forward of a small
Llama, ours vs PEFT (``lora-kernels bench`` prints it after the layers, :func:`.report.model_saved_markdown`;
``--no-model`` leaves it out)."""
from __future__ import annotations

import torch

from .measure import saved_bytes


def model_saved_bytes(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      rank: int = 8, dropout: float = 0.1, batch: int = 2, seq: int = 64) -> dict | None:
    """Bytes saved for backward by one training forward of a whole model (a small Llama built from a
    config: 2 layers, hidden 128, FFN 448, fp32; no download), LoRA on ``targets``: ours vs PEFT's
    layers. Exact (saved_tensors_hooks; parameters excluded, each storage
    counted once). None when transformers is not installed; the PEFT figure is None without peft."""
    try:
        import transformers
    except ImportError:
        return None
    from .. import LoraConfig, inject

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=seq)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).train()
        model.requires_grad_(False)
        return model

    def measure(model):
        known = {p.data_ptr() for p in model.parameters()}
        return saved_bytes(lambda: model(input_ids=ids).logits.float().sum(), known)

    out = {"model": "Llama (2 layers, hidden 128, FFN 448, fp32)", "tokens": batch * seq, "targets": list(targets),
           "rank": rank, "dropout": dropout, "layers": 2 * len(targets)}
    ours = build()
    inject(ours, LoraConfig(rank=rank, alpha=2 * rank, dropout=dropout, target_modules=list(targets)))
    out["ours"] = measure(ours)
    try:
        import peft
        model = peft.get_peft_model(build(), peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                             target_modules=list(targets)))
        out["peft"] = measure(model.train())
    except Exception as exc:  # peft missing or another version's API: said, not hidden
        out["peft"] = None
        out["peft_reason"] = f"{type(exc).__name__}: {exc}"[:200]
    return out

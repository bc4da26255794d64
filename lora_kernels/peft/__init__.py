"""Interoperability with Hugging Face PEFT: run a PeftModel's LoRA/DoRA layers on our kernels.

``convert(peft_model)`` gives every PEFT LoRA ``Linear`` (nn.Linear or GPT-2 Conv1D base; LoRA,
DoRA, ``lora_bias``) and ``Embedding`` (LoRA, DoRA) layer a forward that calls
:func:`lora_kernels.lora_linear` / :func:`lora_kernels.dora_linear` (Embedding: a gather of A's
columns and one rank-r expand added into the base output) with the layer's own tensors. Only the
forward changes: the class becomes a subclass defined in :mod:`lora_kernels.peft.layers`, named like
PEFT's (``lora.Linear(...)`` in the repr, picklable, deep-copyable); parameters, module structure,
state-dict keys, ``merge``/``unmerge``/``set_adapter``/``save_pretrained`` are PEFT's own.

Every LoRA layer ``convert`` leaves alone is returned in ``skipped`` with the reason (Conv, MHA,
``target_parameters``, quantized bases, other variants ...); docs/models.md has the table.
The converted layers follow PEFT in every state — merged, disabled (a merged layer is unmerged
first, as PEFT does), an active adapter the layer does not have (base output) — and refuse, with
``NotImplementedError`` naming the feature, what they do not implement yet: several active
adapters at once and ``adapter_names=`` mixed batches (invalid calls get PEFT's own ValueError).

PEFT's dropout module: with p > 0 we draw our own seeded mask (nn.Dropout's mask is not
reproducible across backends), so results equal PEFT's in distribution, not bit for bit.
"""
from .convert import convert, unconvert

__all__ = ["convert", "unconvert"]

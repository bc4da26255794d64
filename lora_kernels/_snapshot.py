"""All-or-nothing model surgery: a snapshot of everything an operation may change, put back if the
operation fails part-way (issue 20: a refused or failed call leaves the model exactly as it was)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layers import LORA_LAYERS


class _Snapshot:
    """What an operation on a model may change — the module tree, LoRA layers' flags, requires_grad,
    ``lora_configs`` and the given tensors — recorded so that a failure can put all of it back."""

    _FLAGS = ("active_adapter", "merged_adapter", "disabled", "_residual_adapter")

    def __init__(self, model: nn.Module, tensors=()):
        self.model = model
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.flags = [(layer, {k: layer.__dict__[k] for k in self._FLAGS if k in layer.__dict__},
                       dict(layer._buffers)) for layer in (m for m in model.modules() if isinstance(m, LORA_LAYERS))]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.configs = model.__dict__.get("lora_configs", _MISSING)
        seen, self.tensors = set(), []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                # kept in host memory: a PiSSA inject over a whole GPU model must not double its GPU memory
                self.tensors.append((t, t.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for layer, flags, buffers in self.flags:
            for k in self._FLAGS:
                layer.__dict__.pop(k, None)
            layer.__dict__.update(flags)
            layer._buffers.clear()
            layer._buffers.update(buffers)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for t, saved in self.tensors:
            t.copy_(saved)
        if self.configs is _MISSING:
            self.model.__dict__.pop("lora_configs", None)
        else:
            self.model.__dict__["lora_configs"] = self.configs


_MISSING = object()


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, tensors=()):
    """Run the block; if it raises, the model is put back exactly as it was (see _Snapshot)."""
    snapshot = _Snapshot(model, tensors)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise

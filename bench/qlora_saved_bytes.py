"""Bytes saved for backward by one QLoRA layer: PEFT's lora.bnb.Linear4bit vs lora_kernels' QLoRALinear
(CPU, exact byte counts of the tensors autograd keeps; the input x is excluded as it is alive anyway).

    PYTHONPATH=. python bench/qlora_saved_bytes.py      (needs bitsandbytes and peft)

The layer bench measures the same for any shape, with every provider validated first and PEFT's
default (fp32) adapters: lora-kernels bench --saved-bytes-only --quant nf4 (docs/qlora.md).
"""
import copy, logging, torch
logging.disable(logging.WARNING)
from torch import nn
import bitsandbytes as bnb, peft
import lora_kernels as lk
from lora_kernels.qlora_layers import QuantLinear, QLoRALinear
torch.manual_seed(0)
M, K, N, r, p = 512, 1024, 1024, 16, 0.1
dt = torch.bfloat16
lin = nn.Linear(K, N, bias=False)
b4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, quant_type="nf4", compress_statistics=True)
b4.load_state_dict(lin.state_dict()); b4 = b4.to("cpu")
class M_(nn.Module):
    def __init__(s, l): super().__init__(); s.proj = l
    def forward(s, x): return s.proj(x)
def saved_bytes(model, x):
    seen = {}
    def pack(t):
        seen[(t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    seen.pop(x.untyped_storage().data_ptr(), None)  # the input is alive anyway
    return sum(seen.values())
x = torch.randn(M, K, dtype=dt, requires_grad=True)
m = M_(copy.deepcopy(b4)); m.is_loaded_in_4bit = True
pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=2*r, target_modules=["proj"], lora_dropout=p))
print("peft layer type:", type(pm.base_model.model.proj).__module__)
pm.train()
for n_, q_ in pm.named_parameters():
    if 'lora_' in n_: q_.data = q_.data.to(dt)
ours = M_(QLoRALinear(QuantLinear.from_bnb(copy.deepcopy(b4)), r, 2*r, dropout=p)).to(dt).train()
print("PEFT QLoRA saved bytes (excl. x):", saved_bytes(pm, x))
print("lora_kernels QLoRA saved bytes (excl. x):", saved_bytes(ours, x))
print("M*K bf16 =", M*K*2, " N*K bf16 =", N*K*2, " M*r bf16 =", M*r*2)

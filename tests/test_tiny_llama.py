"""A tiny Llama-style model whose projections call lora_kernels' functional API (lora_linear /
dora_linear) with their own parameters; shared by the training tests (compile, checkpointing,
determinism, autocast, DDP/FSDP2). The tests in this file check the model itself against the
float64 reference, so the other tests build on a verified model.

The model deliberately depends only on ``lora_linear`` / ``dora_linear`` (not on LoRALinear).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_kernels.functional import dora_linear, lora_linear
from lora_kernels.reference import dora_linear_ref, lora_linear_ref


@dataclass
class TinyConfig:
    vocab: int = 64
    dim: int = 32
    n_heads: int = 4
    hidden: int = 64
    n_layers: int = 2
    max_seq: int = 32
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.1
    use_dora: bool | tuple[bool, ...] = False  # a tuple: per block (e.g. (False, True): LoRA, then DoRA)
    dtype: torch.dtype = torch.float32  # frozen weights
    adapter_dtype: torch.dtype | None = None  # None: the frozen weights' dtype
    backend: str | None = None


class AdaptedLinear(nn.Module):
    """A frozen (out × in) weight plus a LoRA (or DoRA) adapter computed by lora_kernels."""

    def __init__(self, in_features: int, out_features: int, cfg: TinyConfig):
        super().__init__()
        adapter_dtype = cfg.adapter_dtype or cfg.dtype
        w = torch.randn(out_features, in_features) / math.sqrt(in_features)
        self.weight = nn.Parameter(w.to(cfg.dtype), requires_grad=False)
        self.lora_A = nn.Parameter((torch.randn(cfg.rank, in_features) / math.sqrt(in_features)).to(adapter_dtype))
        # B is not zero (unlike at a real init) so every gradient in the tests is non-trivial.
        self.lora_B = nn.Parameter((0.1 * torch.randn(out_features, cfg.rank)).to(adapter_dtype))
        self.scale = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.backend = cfg.backend
        self.lora_magnitude = None
        if cfg.use_dora:
            norm = torch.linalg.vector_norm(w + self.scale * self.lora_B.float() @ self.lora_A.float(), dim=1)
            self.lora_magnitude = nn.Parameter((norm * (1 + 0.1 * torch.randn(out_features))).to(adapter_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None:
            return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.lora_magnitude, self.scale,
                               dropout_p=self.dropout, training=self.training, backend=self.backend)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, dropout_p=self.dropout,
                           training=self.training, backend=self.backend)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


def _rope(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        assert isinstance(cfg.use_dora, bool)
        d, h = cfg.dim, cfg.hidden
        self.n_heads = cfg.n_heads
        self.attn_norm = RMSNorm(d, cfg.dtype)
        self.q_proj, self.k_proj = AdaptedLinear(d, d, cfg), AdaptedLinear(d, d, cfg)
        self.v_proj, self.o_proj = AdaptedLinear(d, d, cfg), AdaptedLinear(d, d, cfg)
        self.mlp_norm = RMSNorm(d, cfg.dtype)
        self.gate_proj, self.up_proj = AdaptedLinear(d, h, cfg), AdaptedLinear(d, h, cfg)
        self.down_proj = AdaptedLinear(h, d, cfg)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        hn = self.attn_norm(x)

        def heads(z):
            return z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(hn)), heads(self.k_proj(hn)), heads(self.v_proj(hn))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d)).to(x.dtype)
        hn = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(hn)) * self.up_proj(hn)).to(x.dtype)


class TinyLlama(nn.Module):
    """Embedding → blocks (RMSNorm, RoPE causal attention, SwiGLU MLP) → RMSNorm → LM head.

    Every projection of every block is an AdaptedLinear; embeddings, norms and the head are frozen.
    ``checkpointing=True`` wraps each block in non-reentrant torch.utils.checkpoint.
    """

    def __init__(self, cfg: TinyConfig, checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.checkpoint_kwargs = {"use_reentrant": False}  # passed to torch.utils.checkpoint.checkpoint
        self.embed = nn.Embedding(cfg.vocab, cfg.dim, dtype=cfg.dtype)
        self.embed.weight.requires_grad_(False)
        per_block = cfg.use_dora if isinstance(cfg.use_dora, tuple) else (cfg.use_dora,) * cfg.n_layers
        assert len(per_block) == cfg.n_layers
        self.blocks = nn.ModuleList(Block(replace(cfg, use_dora=bool(d))) for d in per_block)
        self.norm = RMSNorm(cfg.dim, cfg.dtype)
        self.head = nn.Parameter((torch.randn(cfg.vocab, cfg.dim) / math.sqrt(cfg.dim)).to(cfg.dtype),
                                 requires_grad=False)
        hd = cfg.dim // cfg.n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(cfg.max_seq, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().to(cfg.dtype), persistent=False)
        self.register_buffer("sin", ang.sin().to(cfg.dtype), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(tokens)
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(block, x, cos, sin, **self.checkpoint_kwargs)
            else:
                x = block(x, cos, sin)
        return F.linear(self.norm(x), self.head)


def make_model(cfg: TinyConfig, seed: int = 0, checkpointing: bool = False) -> TinyLlama:
    """The model, built from its own generator state (independent of the caller's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLlama(cfg, checkpointing)


def make_tokens(cfg: TinyConfig, batch: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over the tokens."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainable(model).items()}


# ---------------------------------------------------------------------------------------------
# The model itself.


def test_adapted_linear_matches_reference_with_dropout():
    """AdaptedLinear (seed=None) equals the float64 reference with the seed it drew; eval: no dropout."""
    for use_dora in (False, True):
        cfg = TinyConfig(dtype=torch.float64, use_dora=use_dora, dropout=0.3)
        layer = make_model(cfg).blocks[0].gate_proj
        x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
        torch.manual_seed(7)
        y = layer(x)
        torch.manual_seed(7)
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # what seed=None draws
        args = (x, layer.weight, layer.lora_A, layer.lora_B)
        if use_dora:
            ref = dora_linear_ref(*args, layer.lora_magnitude, layer.scale, dropout_p=0.3, seed=seed)
        else:
            ref = lora_linear_ref(*args, layer.scale, dropout_p=0.3, seed=seed)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        layer.eval()
        ref0 = (dora_linear_ref(*args, layer.lora_magnitude, layer.scale) if use_dora
                else lora_linear_ref(*args, layer.scale))
        torch.testing.assert_close(layer(x), ref0, rtol=1e-12, atol=1e-12)


def test_only_adapters_train_and_all_get_gradients():
    for use_dora in (False, True):
        cfg = TinyConfig(use_dora=use_dora)
        model = make_model(cfg)
        names = set(trainable(model))
        per_layer = 3 if use_dora else 2
        assert len(names) == cfg.n_layers * 7 * per_layer
        assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude") for n in names)
        lm_loss(model, make_tokens(cfg)).backward()
        for n, g in grads(model).items():
            assert torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

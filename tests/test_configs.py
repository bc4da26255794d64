"""Kernel configs are data; check the invariants the launchers rely on."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is a declared dependency on Linux")

import subprocess  # noqa: E402
import sys  # noqa: E402

from lora_kernels.dropout import SEED_MAX  # noqa: E402
from lora_kernels.kernels import configs, linear_bwd, linear_fwd, shrink  # noqa: E402

_SEEDED = {"shrink": "_lora_shrink_kernel", "linear_bwd": "_lora_linear_bwd_kernel"}


def test_block_sizes_suit_the_dropout_groups():
    """Mask tiles start on multiples of 8 columns: every column block is a multiple of 16."""
    for kind, key in (("shrink", "BLOCK_Q"), ("linear_bwd", "BLOCK_K")):
        for cfg in configs.autotune_configs(kind) + [configs.GPU_FIXED_CONFIG[kind]]:
            assert cfg.kwargs[key] % 16 == 0
        assert configs.INTERPRETER_CONFIG[kind][key] % 16 == 0


def test_seed_is_never_specialised():
    """Compiled (non-interpreter) kernels list the seed words in do_not_specialize, so neither the
    value nor its divisibility by 16 enters the compile key (checked on the JITFunction, in a
    subprocess without TRITON_INTERPRET)."""
    code = (
        "from lora_kernels.kernels import shrink, linear_bwd\n"
        "for k in (shrink._lora_shrink_kernel, linear_bwd._lora_linear_bwd_kernel):\n"
        "    names = [p.name for p in k.params if p.do_not_specialize]\n"
        "    assert {'seed_lo', 'seed_hi'} <= set(names), (k, names)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


class _Recorder:
    """Stands in for a kernel: records the launch arguments instead of running."""

    def __init__(self, fn):
        self.arg_names, self.calls = fn.arg_names, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(dict(zip(self.arg_names, args), **kw))


@pytest.mark.parametrize("kind", ["shrink", "linear_bwd"])
def test_any_seed_gives_the_same_argument_types(kind, monkeypatch):
    """Seeds of any magnitude reach the kernel as two int32-range ints (never i64), and the tokens
    count reaches the autotune key only bucketed: a new seed or sequence length never recompiles
    or re-tunes."""
    module = {"shrink": shrink, "linear_bwd": linear_bwd}[kind]
    rec = _Recorder(getattr(module, _SEEDED[kind]))
    monkeypatch.setattr(module, _SEEDED[kind], rec)
    x, a = torch.randn(40, 32), torch.randn(4, 32)
    for seed in (0, 1, 16, 2**31 + 16, 2**32, 2**62 + 32, SEED_MAX):
        if kind == "shrink":
            shrink.lora_shrink_fwd(x, a, seed, 0.1)
        else:
            g, w, v = torch.randn(40, 24), torch.randn(24, 32), torch.randn(40, 4)
            linear_bwd.lora_linear_bwd(g, w, v, a, x, 2.0, seed, 0.1)
    assert len(rec.calls) == 7
    for call in rec.calls:
        assert all(isinstance(call[n], int) and -2**31 <= call[n] < 2**31 for n in ("seed_lo", "seed_hi"))
        assert call["KEY_TOKENS"] == 64  # 40 tokens, bucketed
    assert len({(c["seed_lo"], c["seed_hi"]) for c in rec.calls}) == 7


def test_autotune_keys_hold_no_exact_token_count():
    for tuned in (shrink._lora_shrink_tuned, linear_fwd._lora_linear_fwd_tuned, linear_bwd._lora_linear_bwd_tuned):
        keys = set(tuned.keys)
        assert "KEY_TOKENS" in keys and not keys & {"M", "P", "Q", "P2", "Q2"}, keys


_FLAGS = [dict(HAS_DROPOUT=False, DORA_DROPOUT=False), dict(HAS_DROPOUT=True, DORA_DROPOUT=False),
          dict(HAS_DROPOUT=True, DORA_DROPOUT=True)]


@pytest.mark.parametrize("kind", ["shrink", "linear_fwd", "linear_bwd"])
@pytest.mark.parametrize("block_r", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("flags", _FLAGS)
def test_every_rank_and_dtype_keeps_a_fitting_config(kind, block_r, dtype, flags):
    prune = configs.prune_by_rank(kind)
    operand = torch.empty(1, dtype=dtype)
    kept = prune(configs.autotune_configs(kind), {"first_ptr": operand}, BLOCK_R=block_r, **flags)
    assert kept and all(configs._fits(kind, c, block_r, operand.element_size(), flags) for c in kept)
    if block_r >= 128 and dtype != torch.float32:  # fp32 GEMM tiles come from a measured list
        assert all(c.num_warps == 8 for c in kept)
    if dtype == torch.float32:  # measured no-spill lists
        assert {configs._key(c) for c in kept} == set(configs._fp32_allowed(kind, block_r))
    else:  # the small fp32-only tiles never reach fp16/bf16
        assert not {configs._key(c) for c in kept} & configs._FP32_ONLY[kind]


def test_prune_rules_drop_the_measured_offenders():
    """The candidates that spilled or duplicated Philox calls in the compile-only sweep are pruned."""
    def kept(kind, flags, block_r=16):
        return {(tuple(c.kwargs.values())[:3], c.num_warps) for c in configs.prune_by_rank(kind)(
            configs.autotune_configs(kind), {"x": torch.empty(1, dtype=torch.bfloat16)}, BLOCK_R=block_r, **flags)}
    dora = dict(HAS_DROPOUT=True, DORA_DROPOUT=True)
    assert ((128, 256, 64), 8) not in kept("linear_fwd", dora) and ((128, 256, 64), 8) in kept("linear_fwd", {})
    assert ((128, 128, 64), 4) not in kept("linear_fwd", dora)
    assert ((128, 128, 64), 8) in kept("linear_fwd", dora) and ((128, 128, 64), 8) not in kept("linear_fwd", dora, 128)
    assert ((128, 64, 64), 4) not in kept("linear_bwd", dora)
    assert ((64, 32, 32), 8) not in kept("linear_bwd", dict(HAS_DROPOUT=True))
    assert ((64, 32), 8) not in {(k[:2], w) for k, w in kept("shrink", dict(HAS_DROPOUT=True))}


@pytest.mark.parametrize("kind", ["shrink", "linear_fwd", "linear_bwd"])
def test_fixed_gpu_config_fits_every_rank(kind, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for block_r in (16, 64, 128, 256):
        for elem in (2, 4):
            for flags in _FLAGS:
                meta = configs.fixed_config(kind, block_r, elem, flags)
                cfg = triton.Config({k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")},
                                    num_warps=meta["num_warps"], num_stages=meta["num_stages"])
                assert configs._fits(kind, cfg, block_r, elem, flags), (kind, block_r, elem, flags, meta)


def test_block_rank_pads_to_power_of_two_at_least_16():
    assert [configs.block_rank(r) for r in (1, 8, 12, 16, 17, 64, 200, 256)] == [16, 16, 16, 16, 32, 64, 256, 256]

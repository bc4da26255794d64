"""Kernel configs are data; check the invariants the launchers rely on."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is a declared dependency on Linux")

from lora_kernels.kernels import configs  # noqa: E402
from lora_kernels.kernels.linear_bwd import _MAX_BLOCK_M  # noqa: E402


def test_split_boundaries_are_whole_blocks_of_every_config():
    """dA/dB split boundaries are multiples of 128 rows (dx) and 256 tokens (dB)."""
    for cfg in configs.autotune_configs("linear_bwd") + [configs.GPU_FIXED_CONFIG["linear_bwd"]]:
        assert _MAX_BLOCK_M % cfg.kwargs["BLOCK_M"] == 0
    for cfg in configs.autotune_configs("shrink") + [configs.GPU_FIXED_CONFIG["shrink"]]:
        assert 256 % cfg.kwargs["BLOCK_Q"] == 0


@pytest.mark.parametrize("kind", ["shrink", "linear_fwd", "linear_bwd"])
@pytest.mark.parametrize("block_r", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_rank_and_dtype_keeps_a_fitting_config(kind, block_r, dtype):
    prune = configs.prune_by_rank(kind)
    operand = torch.empty(1, dtype=dtype)
    kept = prune(configs.autotune_configs(kind), {"first_ptr": operand}, BLOCK_R=block_r)
    assert kept and all(configs._fits(kind, c, block_r, operand.element_size()) for c in kept)
    if block_r >= 128:
        assert all(c.num_warps == 8 for c in kept)


@pytest.mark.parametrize("kind", ["shrink", "linear_fwd", "linear_bwd"])
def test_fixed_gpu_config_fits_every_rank(kind, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for block_r in (16, 64, 128, 256):
        for elem in (2, 4):
            meta = configs.fixed_config(kind, block_r, elem)
            cfg = triton.Config({k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")},
                                num_warps=meta["num_warps"], num_stages=meta["num_stages"])
            assert configs._fits(kind, cfg, block_r, elem), (kind, block_r, elem, meta)


def test_block_rank_pads_to_power_of_two_at_least_16():
    assert [configs.block_rank(r) for r in (1, 8, 12, 16, 17, 64, 200, 256)] == [16, 16, 16, 16, 32, 64, 256, 256]

"""Kernel configs are data; check the invariants the launchers rely on."""
import pytest

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
def test_every_rank_keeps_at_least_one_config(kind, block_r):
    prune = configs.prune_by_rank(kind)
    kept = prune(configs.autotune_configs(kind), {}, BLOCK_R=block_r)
    assert kept and all(configs._fits_rank(kind, c, block_r) for c in kept)


def test_block_rank_pads_to_power_of_two_at_least_16():
    assert [configs.block_rank(r) for r in (1, 8, 12, 16, 17, 64, 200, 256)] == [16, 16, 16, 16, 32, 64, 256, 256]

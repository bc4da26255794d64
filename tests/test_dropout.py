"""The seeded dropout mask: the PyTorch twin against Triton's tl.rand, and the mask's properties."""
import pytest
import torch

from lora_kernels.dropout import SEED_MAX, apply_dropout, dropout_mask, keep_mask, philox_uniform

triton = pytest.importorskip("triton", reason="triton is a declared dependency on Linux")
import triton.language as tl  # noqa: E402

from lora_kernels.kernels.dropout import dropout_multiplier  # noqa: E402


@triton.jit
def _uniform_kernel(out_ptr, seed, base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, offs + base), mask=offs < n)


@triton.jit
def _mask_kernel(out_ptr, seed, p, keep_scale, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r < rows)[:, None] & (c < cols)[None, :]
    z = dropout_multiplier(seed, r[:, None] * cols + c[None, :], p, keep_scale)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], z, mask=inside)


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31 + 5, 2**62 + 12345, SEED_MAX])
def test_twin_matches_tl_rand_bit_for_bit(kernel_device, seed):
    n = 3000
    out = torch.full((n,), float("nan"), device=kernel_device)
    _uniform_kernel[(triton.cdiv(n, 1024),)](out, seed, 0, n, BLOCK=1024)
    twin = philox_uniform(seed, torch.arange(n, device=kernel_device))
    assert torch.equal(out, twin), f"seed {seed}: {(out != twin).sum().item()} of {n} samples differ"


def test_twin_matches_tl_rand_beyond_2_pow_32(kernel_device):
    """Offsets above 2**32 use the counter's high word: indices of tensors over 4G elements."""
    base = 2**33 + 17
    out = torch.full((256,), float("nan"), device=kernel_device)
    _uniform_kernel[(1,)](out, 99, base, 256, BLOCK=256)
    assert torch.equal(out, philox_uniform(99, torch.arange(256, device=kernel_device) + base))


@pytest.mark.parametrize("rows,cols,p", [(37, 70, 0.1), (64, 65, 0.5), (5, 300, 0.9)])
@pytest.mark.parametrize("blocks", [(16, 32), (32, 64)])
def test_kernel_mask_equals_torch_mask_for_any_blocking(kernel_device, rows, cols, p, blocks):
    seed = 4242
    out = torch.full((rows, cols), float("nan"), device=kernel_device)
    grid = (triton.cdiv(rows, blocks[0]), triton.cdiv(cols, blocks[1]))
    _mask_kernel[grid](out, seed, p, 1.0 / (1.0 - p), rows, cols, BLOCK_R=blocks[0], BLOCK_C=blocks[1])
    expected = dropout_mask(seed, rows, cols, p, device=kernel_device)
    assert torch.equal(out, expected)


def test_mask_statistics():
    keep = keep_mask(7, 400, 500, 0.3)
    frac = keep.float().mean().item()
    assert abs(frac - 0.7) < 0.01, frac
    # rows and columns are not correlated: each row's keep rate is close to 0.7 too
    assert keep.float().mean(1).sub(0.7).abs().max().item() < 0.1


def test_same_seed_same_mask_and_different_seed_different_mask():
    a = keep_mask(11, 50, 60, 0.5)
    assert torch.equal(a, keep_mask(11, 50, 60, 0.5))
    assert not torch.equal(a, keep_mask(12, 50, 60, 0.5))


def test_mask_values_and_p_zero():
    z = dropout_mask(3, 20, 30, 0.25, dtype=torch.float64)
    assert set(z.unique().tolist()) <= {0.0, 1.0 / 0.75}
    assert torch.equal(dropout_mask(3, 20, 30, 0.0), torch.ones(20, 30))


def test_apply_dropout_is_a_product_so_nan_propagates():
    x = torch.randn(10, 40, dtype=torch.float64)
    x[0, :] = float("nan")
    xd = apply_dropout(x, 5, 0.5)
    assert torch.isnan(xd[0]).all(), "dropout must not silently zero a NaN"
    z = dropout_mask(5, 10, 40, 0.5, dtype=torch.float64)
    torch.testing.assert_close(xd[1:], x[1:] * z[1:], rtol=0, atol=0)


def test_seed_out_of_range():
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(-1, torch.arange(4))
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(2**63, torch.arange(4))


def test_numpy_and_torch_twins_agree():
    """CPU masks come from numpy, other devices from torch ops: both must be the same Philox."""
    from lora_kernels.dropout import _philox_torch, philox_randint

    offsets = torch.cat([torch.arange(5000), torch.arange(300) + 2**33 + 11])
    for seed in (0, 77, 2**40 + 3, SEED_MAX):
        assert torch.equal(philox_randint(seed, offsets), _philox_torch(seed, offsets))

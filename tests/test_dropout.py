"""The seeded dropout mask: the numpy/PyTorch twins against the kernels' Triton code, and the mask's
properties (definition in lora_kernels/dropout.py: 16 elements per Philox call, 8-bit thresholds)."""
import pytest
import torch

from lora_kernels.dropout import (SEED_MAX, _philox_torch, apply_dropout, dropout_mask, dropout_threshold,
                                  effective_p, keep_mask, keep_scale, mask_samples, philox4x32, seed_halves)

triton = pytest.importorskip("triton", reason="triton is a declared dependency on Linux")
import triton.language as tl  # noqa: E402

from lora_kernels.kernels.dropout import keep_tile, philox_words  # noqa: E402


@triton.jit
def _words_kernel(out_ptr, seed_lo, seed_hi, base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = philox_words(seed_lo, seed_hi, offs + base)
    inside = offs < n
    tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int64), mask=inside)
    tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64), mask=inside)
    tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64), mask=inside)
    tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64), mask=inside)


@triton.jit
def _keep_kernel(out_ptr, seed_lo, seed_hi, threshold, rows, cols, row_base,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    inside = (r < rows)[:, None] & (c < cols)[None, :]
    keep = keep_tile(seed_lo, seed_hi, threshold, r + row_base, c0, tl.cdiv(cols, 16), BLOCK_R, BLOCK_C)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], keep.to(tl.int8), mask=inside)


def _kernel_keep(device, seed, rows, cols, p, blocks, row_base=0):
    out = torch.full((rows, cols), -1, dtype=torch.int8, device=device)
    lo, hi = seed_halves(seed)
    grid = (triton.cdiv(rows, blocks[0]), triton.cdiv(cols, blocks[1]))
    _keep_kernel[grid](out, lo, hi, dropout_threshold(p), rows, cols, row_base, BLOCK_R=blocks[0], BLOCK_C=blocks[1])
    return out.bool()


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31 + 5, 2**32 - 1, 2**62 + 12345, SEED_MAX])
def test_twin_matches_triton_philox_bit_for_bit(kernel_device, seed):
    n = 1000
    out = torch.full((n, 4), -1, dtype=torch.int64, device=kernel_device)
    lo, hi = seed_halves(seed)
    _words_kernel[(triton.cdiv(n, 512),)](out, lo, hi, 0, n, BLOCK=512)
    twin = philox4x32(seed, torch.arange(n, device=kernel_device))
    assert torch.equal(out, twin), f"seed {seed}: {(out != twin).sum().item()} of {4 * n} words differ"


def test_twin_matches_triton_philox_beyond_2_pow_32(kernel_device):
    """Counters above 2**32 use the counter's high word (inputs with more than 2**35 elements)."""
    base = 2**33 + 17
    out = torch.full((256, 4), -1, dtype=torch.int64, device=kernel_device)
    lo, hi = seed_halves(99)
    _words_kernel[(1,)](out, lo, hi, base, 256, BLOCK=256)
    assert torch.equal(out, philox4x32(99, torch.arange(256, device=kernel_device) + base))


@pytest.mark.parametrize("rows,cols,p", [(37, 70, 0.1), (64, 65, 0.5), (5, 300, 0.9), (9, 8, 0.3)])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 64)])
def test_kernel_keep_bits_equal_twin_for_any_blocking(kernel_device, rows, cols, p, blocks):
    seed = 2**40 + 4242
    assert torch.equal(_kernel_keep(kernel_device, seed, rows, cols, p, blocks),
                       keep_mask(seed, rows, cols, p, device=kernel_device))


def test_kernel_keep_bits_at_counters_beyond_2_pow_32(kernel_device):
    """Rows far down a huge input: the counter m·ceil(K/16) + k//16 exceeds 2**32."""
    rows, cols, row_base = 4, 40, 2**32 // 3 + 3
    got = _kernel_keep(kernel_device, 7, rows, cols, 0.25, (16, 32), row_base=row_base)
    full = mask_samples(7, 1, cols)  # shape check of the helper; the rows below come from counters
    kg = -(-cols // 16)
    assert row_base * kg > 2**32
    words = philox4x32(7, (torch.arange(rows * kg) + row_base * kg).to(kernel_device))  # (rows·kg, 4)
    samples = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1).reshape(rows, kg * 16)[:, :cols]
    assert full.shape == (1, cols)
    assert torch.equal(got, samples >= dropout_threshold(0.25))


def test_torch_and_numpy_twins_agree():
    """CPU masks come from numpy, other devices from torch ops: both must be the same Philox."""
    counters = torch.cat([torch.arange(5000), torch.arange(300) + 2**33 + 11])
    for seed in (0, 77, 2**40 + 3, SEED_MAX):
        assert torch.equal(philox4x32(seed, counters), torch.stack(_philox_torch(seed, counters), dim=-1))


def test_mask_layout_follows_the_definition():
    """Element (m, k): counter m·ceil(K/16) + k//16, word (k%16)//4, byte k%4."""
    seed, rows, cols = 5, 3, 37
    h = mask_samples(seed, rows, cols)
    kg = 3
    words = philox4x32(seed, torch.arange(rows * kg)).view(rows, kg, 4)
    for m in range(rows):
        for k in range(cols):
            w = int(words[m, k // 16, (k % 16) // 4])
            assert int(h[m, k]) == (w >> (8 * (k % 4))) & 0xFF


def test_threshold_effective_p_and_keep_scale():
    assert dropout_threshold(0.1) == 26 and effective_p(0.1) == 26 / 256
    assert keep_scale(0.1) == 1.0 / (1.0 - 26 / 256)
    assert dropout_threshold(0.0) == 0 and keep_scale(0.0) == 1.0
    assert dropout_threshold(0.999) == 255  # never drops everything
    for p in (0.05, 0.1, 0.3, 0.5, 0.9):
        assert abs(effective_p(p) - p) <= 2**-9
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_threshold(1.0)


def test_mask_statistics():
    keep = keep_mask(7, 400, 500, 0.3)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - effective_p(0.3))) < 0.01, frac
    # rows, columns and the 16 positions inside a Philox call are not biased
    assert keep.float().mean(1).sub(0.7).abs().max().item() < 0.1
    per_slot = keep[:, :496].reshape(400, 31, 16).float().mean((0, 1))
    assert per_slot.sub(0.7).abs().max().item() < 0.03, per_slot


def test_same_seed_same_mask_and_different_seed_different_mask():
    a = keep_mask(11, 50, 60, 0.5)
    assert torch.equal(a, keep_mask(11, 50, 60, 0.5))
    assert not torch.equal(a, keep_mask(12, 50, 60, 0.5))
    assert not torch.equal(a, keep_mask(11 + 2**32, 50, 60, 0.5))  # the high seed word matters


def test_mask_of_a_row_does_not_depend_on_the_row_count():
    assert torch.equal(keep_mask(3, 10, 33, 0.4)[:4], keep_mask(3, 4, 33, 0.4))


def test_mask_values_and_p_zero():
    z = dropout_mask(3, 20, 30, 0.25, dtype=torch.float64)
    assert set(z.unique().tolist()) <= {0.0, keep_scale(0.25)}
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
        philox4x32(-1, torch.arange(4))
    with pytest.raises(ValueError, match="seed"):
        keep_mask(2**63, 2, 2, 0.5)


def test_seed_halves_are_int32_bit_patterns():
    for seed in (0, 1, 2**31, 2**32 - 1, 2**32, 2**62 + 5, SEED_MAX):
        lo, hi = seed_halves(seed)
        assert -2**31 <= lo < 2**31 and -2**31 <= hi < 2**31
        assert ((hi & 0xFFFFFFFF) << 32) | (lo & 0xFFFFFFFF) == seed

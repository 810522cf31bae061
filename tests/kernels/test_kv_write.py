from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda

from baton.kernels.kv_write import write_kv, write_kv_reference


def _run(num_tokens, num_kv_heads, head_dim, dtype, device, slot_dtype=torch.int64, num_blocks=9, block_size=16,
         num_layers=3, layer=2, padded=0, src_dtype=None):
    kv_cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    # k and v as views into one fused qkv projection output, as the model produces them
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, device=device).to(src_dtype or dtype)
    k, v = qkv[:, 2 * num_kv_heads: 3 * num_kv_heads], qkv[:, 3 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[num_tokens - padded:] = -1
    slots = slots.to(slot_dtype)
    expected = kv_cache.clone()
    write_kv_reference(expected, layer, k, v, slots)
    write_kv(kv_cache, layer, k, v, slots)
    if src_dtype is None:
        assert torch.equal(kv_cache, expected)  # a copy: bit for bit, and nothing else touched
    else:
        assert_close(kv_cache, expected)  # the interpreter truncates fp32 -> bf16 where torch rounds


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_scattered_slots(device, slot_dtype):
    _run(37, 2, 16, torch.float32, device, slot_dtype=slot_dtype)


def test_padded_tokens_are_skipped(device):
    _run(20, 3, 32, torch.bfloat16, device, padded=6)


def test_casts_to_cache_dtype(device):
    _run(11, 1, 16, torch.bfloat16, device, src_dtype=torch.float32)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_stores_values_over_the_layer_scales(device, src_dtype):
    """x / scale, saturated at +-448 and rounded to e4m3 as torch rounds: the same bytes as the reference."""
    num_blocks, num_layers, block_size, heads, dim, layer = 5, 3, 8, 2, 16, 1
    cache = torch.randn(num_blocks, num_layers, 2, block_size, heads, dim, device=device).to(torch.float8_e4m3fn)
    k = (torch.randn(13, heads, dim, device=device) * 3).to(src_dtype)
    v = torch.randn(13, heads, dim, device=device).to(src_dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:13]
    slots[-2:] = -1
    kv_scale = torch.tensor([0.01, 0.3], device=device)  # K / 0.01 saturates often
    expected = cache.clone()
    write_kv_reference(expected, layer, k, v, slots, kv_scale)
    write_kv(cache, layer, k, v, slots, kv_scale)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    written = expected[slots[:-2] // block_size, layer, :, slots[:-2] % block_size].float()
    assert written[:, 0].abs().max() == 448 and written[:, 1].abs().max() < 448
    back = written * kv_scale.view(1, 2, 1, 1)  # within e4m3's relative step where nothing saturated
    fine = written[:, 1].abs() < 448
    torch.testing.assert_close(back[:, 1][fine], v[:-2].float()[fine], rtol=0.0625, atol=0.3 * 2 ** -9)


def test_fp8_rounding_matches_torch_at_every_step_and_tie(device):
    """Every finite e4m3 value, every midpoint between neighbours (ties go to even) and the floats either side
    of it, beyond +-448, and -0.0: stored as torch's saturating cast stores them."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([449.0, 464.0, 465.0, -1000.0, -0.0])])
    x = torch.cat([x, torch.zeros(-len(x) % 32)]).to(device)
    k = x.view(-1, 1, 16)
    v = k * 0.25  # a power-of-two scale divides it back exactly: the same ties
    kv_scale = torch.tensor([1.0, 0.25], device=device)
    cache = torch.zeros(k.shape[0], 1, 2, 1, 1, 16, dtype=torch.float8_e4m3fn, device=device)
    slots = torch.arange(k.shape[0], device=device)
    write_kv(cache, 0, k, v, slots, kv_scale)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(-1, 1, 1, 16).expand(-1, 2, -1, -1)
    assert torch.equal(cache[:, 0, :, 0].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens,padded", [(1, 0), (64, 5), (4096, 0)])
def test_llama3_8b_shapes(num_tokens, padded):
    _run(num_tokens, 8, 128, torch.bfloat16, "cuda", num_blocks=600, num_layers=4, padded=padded)

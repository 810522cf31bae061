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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens,padded", [(1, 0), (64, 5), (4096, 0)])
def test_llama3_8b_shapes(num_tokens, padded):
    _run(num_tokens, 8, 128, torch.bfloat16, "cuda", num_blocks=600, num_layers=4, padded=padded)

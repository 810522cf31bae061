from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda

from baton.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin


def _run(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, max_pos=64):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cos, sin = rope_cos_sin(inv_freq, max_pos)
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    # q and k as views into one fused qkv output, as the model has them
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads: num_heads + num_kv_heads]
    v_before = qkv[:, num_heads + num_kv_heads:].clone()
    ref_q, ref_k = apply_rope_reference(q, k, positions, cos, sin)
    apply_rope(q, k, positions, cos, sin)
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v_before)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 16), (3, 1, 32), (4, 1, 12)])
def test_rope_fp32(device, num_heads, num_kv_heads, head_dim):
    _run(9, num_heads, num_kv_heads, head_dim, torch.float32, device)


def test_rope_bf16(device):
    _run(7, 4, 2, 32, torch.bfloat16, device)


def test_cache_matches_model_rotary(device):
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 16, 2, device=device).float() / 16))
    cos, sin = rope_cos_sin(inv_freq, 100)
    positions = torch.tensor([0, 5, 99], device=device)
    freqs = positions[:, None].float() * inv_freq[None, :]  # engine/model.py Rotary.forward
    assert torch.equal(cos[positions], freqs.cos()) and torch.equal(sin[positions], freqs.sin())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_llama3_8b_shapes(num_tokens):
    _run(num_tokens, 32, 8, 128, torch.bfloat16, "cuda", max_pos=8192)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_kv_write_in_one_launch(device, dtype):
    """The fused kernel rotates q and k in place and writes rotated k and v into the cache, skipping slot -1,
    exactly as apply_rope followed by kernels/kv_write.py."""
    from baton.kernels.kv_write import write_kv_reference

    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 5, 4, 2, 16, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cos, sin = rope_cos_sin(inv_freq, 64)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads: num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads:]
    cache = torch.randn(6, 3, 2, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    expected_cache = cache.clone()
    slots = torch.tensor([9, 2, -1, 23, 14], device=device)
    ref_q, ref_k = apply_rope_reference(q, k, positions, cos, sin)
    write_kv_reference(expected_cache, 1, ref_k, v, slots)
    apply_rope(q, k, positions, cos, sin, kv=(v, cache, 1, slots))
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    assert_close(cache, expected_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_fp8_kv_write_in_one_launch(device, dtype):
    """With an FP8 cache the fused kernel stores rotated k / k_scale and v / v_scale as kernels/kv_write.py does.
    Its rotation may round differently from the reference's in the last place, so an element may land one e4m3
    step away; nearly all are the same bytes."""
    from baton.kernels.kv_write import write_kv_reference

    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 6, 4, 2, 16, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cos, sin = rope_cos_sin(inv_freq, 64)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads: num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads:]
    cache = torch.randn(6, 3, 2, block_size, num_kv_heads, head_dim, device=device).to(torch.float8_e4m3fn)
    expected = cache.clone()
    slots = torch.tensor([9, 2, -1, 23, 14, 0], device=device)
    kv_scale = torch.tensor([0.004, 0.05], device=device)  # k / 0.004 saturates for |k| > 1.8
    ref_q, ref_k = apply_rope_reference(q, k, positions, cos, sin)
    write_kv_reference(expected, 1, ref_k, v, slots, kv_scale)
    apply_rope(q, k, positions, cos, sin, kv=(v, cache, 1, slots, kv_scale))
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    same = cache.view(torch.uint8) == expected.view(torch.uint8)
    assert same.float().mean() > 0.99
    got, want = cache.float(), expected.float()
    assert ((got - want).abs() <= 0.125 * want.abs() + 2 ** -9).all()

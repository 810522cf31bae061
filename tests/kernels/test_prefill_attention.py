from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, paged_cache, poisoned

from baton.kernels.prefill_attention import prefill_attention, prefill_attention_reference


def _run(chunks, num_heads, num_kv_heads, head_dim, dtype, device, window=None, block_size=16, num_layers=2,
         layer=1, fp8_scales=None, fp8_gain=4.0, **blocks):
    """chunks: (tokens already cached before this chunk, chunk length) per request. fp8_scales: (k_scale,
    v_scale) of an FP8 cache, quantized from the random one (dtype is then q's)."""
    context_lens = [cached + n for cached, n in chunks]
    kv_cache, tables, kv_scale = paged_cache(context_lens, num_layers, block_size, num_kv_heads, head_dim, dtype,
                                             device, fp8_scales, fp8_gain)
    cu = torch.tensor([0] + [n for _, n in chunks], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, device=device).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = poisoned(*q.shape, dtype=dtype, device=device)
    prefill_attention(q, kv_cache, layer, cu, lens, tables, scale, window, out=out, kv_scale=kv_scale, **blocks)
    assert_close(out, prefill_attention_reference(q, kv_cache, layer, cu, lens, tables, scale, window, kv_scale))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (3, 1), (4, 1)])
def test_prefix_hits_and_fresh_prompts_fp32(device, num_heads, num_kv_heads):
    _run([(0, 21), (32, 5), (7, 1), (0, 3)], num_heads, num_kv_heads, 16, torch.float32, device)


def test_several_query_and_key_tiles(device):
    _run([(19, 40), (0, 37)], 2, 1, 32, torch.float32, device, block_m=16, block_n=16)


def test_bf16_head_dim_32(device):
    _run([(40, 18), (0, 9)], 4, 2, 32, torch.bfloat16, device)


@pytest.mark.parametrize("window", [1, 6, 20, 50])
def test_sliding_window(device, window):
    _run([(25, 30), (3, 4)], 2, 1, 16, torch.float32, device, window=window, block_m=16, block_n=16)


@pytest.mark.parametrize("window", [None, 21, 50])
def test_every_tile_alignment(device, window):
    # chunks starting at every offset within a 16-key tile, so each boundary between masked and mask-free
    # key tiles lands on every residue
    _run([(cached + 16 * (cached % 3), 17 + cached % 5) for cached in range(16)], 1, 1, 16, torch.float32, device,
         window=window, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_reads_values_times_the_layer_scales(device, dtype):
    # scales far from 1 and unequal, so a missing or swapped K/V scale shows; some values saturate at 448
    _run([(19, 40), (0, 21), (5, 3)], 2, 1, 16, dtype, device, block_m=16, block_n=16, fp8_scales=(0.011, 0.37))
    _run([(25, 30)], 2, 1, 16, torch.float32, device, window=6, block_m=16, block_n=16, fp8_scales=(0.05, 2.0))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("window", [None, 700])
def test_llama3_8b_shapes(window):
    # a long fresh prompt, chunked prefills behind prefix hits, a decode-sized chunk, in one flat batch
    chunks = [(0, 2048), (1024, 512), (3000, 1096), (15, 1), (0, 77), (512, 333)]
    _run(chunks, 32, 8, 128, torch.bfloat16, "cuda", window=window)


@pytest.mark.gpu
@needs_cuda
def test_llama3_8b_shapes_fp8_cache():
    chunks = [(0, 2048), (1024, 512), (15, 1), (512, 333)]
    _run(chunks, 32, 8, 128, torch.bfloat16, "cuda", fp8_scales=(0.013, 0.021), fp8_gain=1.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(12, 4), (8, 8)])
def test_head_dim_64_dtypes(dtype, num_heads, num_kv_heads):
    _run([(100, 300), (0, 129), (2000, 64)], num_heads, num_kv_heads, 64, dtype, "cuda", window=257)

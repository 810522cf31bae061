from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, paged_cache, poisoned

from baton.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    pick_num_splits,
)


def _run(context_lens, num_heads, num_kv_heads, head_dim, dtype, device, window=None, num_splits=4,
         block_size=16, num_layers=2, layer=1, fp8_scales=None, fp8_gain=4.0, fused_merge=False, calls=1):
    """fp8_scales: (k_scale, v_scale) of an FP8 cache, quantized from the random one (dtype is then q's).
    calls > 1: the same inputs again, each call into a fresh poisoned output (the fused merge's counters must
    be back at zero after every call)."""
    kv_cache, tables, kv_scale = paged_cache(context_lens, num_layers, block_size, num_kv_heads, head_dim, dtype,
                                             device, fp8_scales, fp8_gain)
    batch = len(context_lens)
    q = torch.randn(batch, num_heads, head_dim, device=device).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    expected = paged_decode_attention_reference(q, kv_cache, layer, tables, lens, scale, window, kv_scale)
    for _ in range(calls):
        out = poisoned(batch, num_heads, head_dim, dtype=dtype, device=device)
        partial_out = poisoned(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        partial_lse = poisoned(batch, num_heads, num_splits, dtype=torch.float32, device=device)
        paged_decode_attention(q, kv_cache, layer, tables, lens, scale, window, num_splits, out=out,
                               partial_out=partial_out, partial_lse=partial_lse, kv_scale=kv_scale,
                               fused_merge=fused_merge)
        if num_splits > 1:  # one split writes its output directly and no scratch
            assert not partial_out.isnan().any() and not partial_lse.isnan().any(), "a split left its scratch unwritten"
        assert_close(out, expected)
    return out


@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2)])
def test_gqa_groups_fp32(device, num_heads, num_kv_heads, fused_merge):
    """The last split merges (fused) or a second kernel does: the same answer, call after call."""
    _run([37, 5, 16, 70], num_heads, num_kv_heads, 16, torch.float32, device, fused_merge=fused_merge, calls=2)


def test_head_dim_32_bf16_uneven_batch(device):
    _run([1, 90, 17], 4, 1, 32, torch.bfloat16, device, num_splits=3)


def test_sliding_window_spans_splits(device):
    # windows that cut mid-block, one shorter than a block, and one longer than the context
    _run([70, 33, 9], 4, 2, 16, torch.float32, device, window=21)
    _run([70, 33], 3, 1, 16, torch.float32, device, window=5, num_splits=2)
    _run([12], 3, 1, 16, torch.float32, device, window=100, num_splits=2)


def test_more_splits_than_pages_and_one_split(device):
    _run([3, 20], 4, 2, 16, torch.float32, device, num_splits=5)
    _run([45, 3], 4, 2, 16, torch.float32, device, num_splits=1)


def test_empty_context_gives_zeros(device):
    out = _run([0, 21], 4, 2, 16, torch.float32, device, num_splits=2)
    assert out[0].eq(0).all()


@pytest.mark.parametrize("window", [None, 19])
def test_every_context_length(device, window):
    _run(list(range(34)), 2, 1, 16, torch.float32, device, window=window, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_reads_values_times_the_layer_scales(device, dtype):
    # scales far from 1 and unequal, so a missing or swapped K/V scale shows; some values saturate at 448
    _run([37, 5, 70], 4, 2, 16, dtype, device, num_splits=3, fp8_scales=(0.011, 0.37))
    _run([33, 9], 3, 1, 16, torch.float32, device, window=21, num_splits=2, fp8_scales=(0.05, 2.0))


def test_pick_num_splits_fills_the_machine():
    assert pick_num_splits(8, 8, num_sms=132) * 8 * 8 >= 2 * 132
    assert pick_num_splits(64, 8, num_sms=132) == 1
    assert pick_num_splits(1, 8, num_sms=132, max_splits=32) == 32


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("batch,max_ctx", [(1, 4096), (7, 1500), (64, 4096)])
def test_llama3_8b_shapes(batch, max_ctx, fused_merge):
    lens = torch.randint(1, max_ctx + 1, (batch,)).tolist()
    lens[0] = max_ctx
    _run(lens, 32, 8, 128, torch.bfloat16, "cuda", num_splits=pick_num_splits(batch, 8), num_layers=3,
         fused_merge=fused_merge, calls=20)


@pytest.mark.gpu
@needs_cuda
def test_fused_merge_under_many_splits_repeatedly():
    """Many splits racing to be last, 200 calls: every output right, so no partial was read before written."""
    lens = torch.randint(500, 4097, (4,)).tolist()
    _run(lens, 32, 8, 128, torch.bfloat16, "cuda", num_splits=64, num_layers=1, layer=0, calls=200, fused_merge=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,window", [(24, 8, None), (16, 4, 1000), (12, 12, 333)])
def test_head_dim_64_windows_dtypes(dtype, num_heads, num_kv_heads, window):
    lens = torch.randint(1, 3000, (9,)).tolist()
    _run(lens, num_heads, num_kv_heads, 64, dtype, "cuda", window=window, num_splits=6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch,max_ctx", [(1, 4096), (64, 2048)])
def test_llama3_8b_shapes_fp8_cache(batch, max_ctx):
    lens = torch.randint(1, max_ctx + 1, (batch,)).tolist()
    lens[0] = max_ctx
    _run(lens, 32, 8, 128, torch.bfloat16, "cuda", num_splits=pick_num_splits(batch, 8), num_layers=3,
         fp8_scales=(0.013, 0.021), fp8_gain=1.0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_follows_new_inputs():
    """One capture serves every later step: contexts and queries change in place, the grid does not."""
    batch, heads, kv_heads, dim, splits = 8, 32, 8, 128, pick_num_splits(8, 8)
    lens_a = torch.randint(1, 2000, (batch,)).tolist()
    kv_cache, tables, _ = paged_cache([2000] * batch, 2, 16, kv_heads, dim, torch.bfloat16, "cuda")
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lens_a, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    part_out = torch.empty(batch, heads, splits, dim, device="cuda")
    part_lse = torch.empty(batch, heads, splits, device="cuda")

    def step():
        paged_decode_attention(q, kv_cache, 0, tables, lens, dim ** -0.5, None, splits, out, part_out, part_lse)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.randint(1, 2001, (batch,), dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        assert_close(out, paged_decode_attention_reference(q, kv_cache, 0, tables, lens, dim ** -0.5, None))

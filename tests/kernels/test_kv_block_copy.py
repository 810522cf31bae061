from __future__ import annotations

import pytest
import torch
from kernel_checks import needs_cuda

from baton.kernels.kv_block_copy import copy_kv_block_layers, copy_kv_blocks, copy_kv_blocks_reference


def _pools(num_src, num_dst, shape, dtype, device):
    src = torch.randn(num_src, *shape, device=device).to(dtype)
    dst = torch.randn(num_dst, *shape, device=device).to(dtype)
    return src, dst


def _ids(n, num_blocks, device):
    return torch.randperm(num_blocks, device=device)[:n].to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_whole_blocks_between_pools(device, dtype):
    src, dst = _pools(12, 9, (3, 2, 16, 2, 16), dtype, device)
    src_ids, dst_ids = _ids(5, 12, device), _ids(5, 9, device)
    expected = dst.clone()
    copy_kv_blocks_reference(src, expected, src_ids, dst_ids)
    copy_kv_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))  # FP8 blocks: the bytes as they are


def test_odd_byte_layout_within_one_pool(device):
    # 1*2*3*1*3 bf16 elements per layer: 36 bytes is whole words, 18 elements would not be; check odd too
    pool = torch.randn(10, 2, 2, 3, 1, 3, device=device).to(torch.float16)
    ids = torch.randperm(10, device=device).to(torch.int64)
    src_ids, dst_ids = ids[:4], ids[4:8]
    expected = pool.clone()
    copy_kv_blocks_reference(pool, expected, src_ids, dst_ids)
    copy_kv_blocks(pool, pool, src_ids, dst_ids)
    assert torch.equal(pool, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("layer_start,layer_end", [(0, 1), (1, 3), (3, 4), (2, 2)])
def test_layer_range(device, layer_start, layer_end, dtype):
    src, dst = _pools(7, 7, (4, 2, 8, 1, 16), dtype, device)
    src_ids, dst_ids = _ids(4, 7, device), _ids(4, 7, device)
    expected = dst.clone()
    copy_kv_blocks_reference(src, expected, src_ids, dst_ids, layer_start, layer_end)
    copy_kv_block_layers(src, dst, src_ids, dst_ids, layer_start, layer_end, block=64)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layers", [None, (5, 9)])
def test_llama3_8b_blocks(layers):
    # 320 scattered blocks of a 32-layer Llama-3-8B pool: a 5k-token prompt, 640 MiB
    src, dst = _pools(400, 500, (32, 2, 16, 8, 128), torch.bfloat16, "cuda")
    src_ids, dst_ids = _ids(320, 400, "cuda"), _ids(320, 500, "cuda")
    expected = dst.clone()
    if layers is None:
        copy_kv_blocks_reference(src, expected, src_ids, dst_ids)
        copy_kv_blocks(src, dst, src_ids, dst_ids)
    else:
        copy_kv_blocks_reference(src, expected, src_ids, dst_ids, *layers)
        copy_kv_block_layers(src, dst, src_ids, dst_ids, *layers)
    assert torch.equal(dst, expected)

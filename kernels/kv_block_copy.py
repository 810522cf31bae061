"""Copies whole KV blocks, or a range of their layers, between two pools of the same layout in one launch.

The pools may be one tensor or two (e.g. a peer's pool opened through CUDA IPC); bytes are moved as words,
so any cache dtype copies bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_TILES_PER_SPAN = 65535  # the grid's second axis


@triton.jit
def _copy_spans_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    block_words, span_start, span_words,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < span_words
    src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
    words = tl.load(src_ptr + src_block * block_words + span_start + offs, mask=mask)
    tl.store(dst_ptr + dst_block * block_words + span_start + offs, words, mask=mask)


def _as_words(pool: torch.Tensor) -> torch.Tensor:
    """The pool as [num_blocks, words]: 4-byte words when a layer's slice allows it, so that loads vectorise."""
    assert pool.is_contiguous(), "a pool must be contiguous so that each block is one span"
    raw = pool.view(pool.shape[0], -1).view(torch.uint8)
    layer_bytes = raw.shape[1] // pool.shape[1]
    return raw.view(torch.int32) if layer_bytes % 4 == 0 else raw


def copy_kv_block_layers(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src_block_ids: torch.Tensor,
    dst_block_ids: torch.Tensor,
    layer_start: int,
    layer_end: int,
    block: int = 4096,
) -> None:
    """dst_pool[dst_block_ids[i], layer_start:layer_end] = src_pool[src_block_ids[i], layer_start:layer_end].

    Pools are [num_blocks, num_layers, ...] with equal per-block shapes and dtypes. Within a pool the
    destination blocks must not overlap the source blocks of the same call.
    """
    assert src_pool.shape[1:] == dst_pool.shape[1:] and src_pool.dtype == dst_pool.dtype
    assert 0 <= layer_start <= layer_end <= src_pool.shape[1] and src_block_ids.shape == dst_block_ids.shape
    src, dst = _as_words(src_pool), _as_words(dst_pool)
    block_words = src.shape[1]
    layer_words = block_words // src_pool.shape[1]
    span_words = (layer_end - layer_start) * layer_words
    if src_block_ids.numel() == 0 or span_words == 0:
        return
    tiles = triton.cdiv(span_words, block)
    assert tiles <= _MAX_TILES_PER_SPAN, "raise block: the span has too many tiles for one grid axis"
    _copy_spans_kernel[(src_block_ids.numel(), tiles)](
        src, dst, src_block_ids, dst_block_ids, block_words, layer_start * layer_words, span_words,
        BLOCK=block, num_warps=8,
    )


def copy_kv_blocks(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_block_ids: torch.Tensor,
                   dst_block_ids: torch.Tensor) -> None:
    """dst_pool[dst_block_ids[i]] = src_pool[src_block_ids[i]] for every i, all layers, K and V."""
    copy_kv_block_layers(src_pool, dst_pool, src_block_ids, dst_block_ids, 0, src_pool.shape[1])


def copy_kv_blocks_reference(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_block_ids: torch.Tensor,
                             dst_block_ids: torch.Tensor, layer_start: int = 0, layer_end: int | None = None) -> None:
    layers = slice(layer_start, layer_end)
    dst_pool[dst_block_ids.long(), layers] = src_pool[src_block_ids.long(), layers]

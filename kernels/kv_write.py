"""Writes one step's keys and values into the paged KV cache of one layer, in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, kv_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv_block, stride_kv_layer, stride_kv_kv, stride_kv_slot, stride_kv_head,
    layer,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # slot < 0 marks a padded token of a graph batch: nothing to write.
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_kv_block + layer * stride_kv_layer
           + (slot % BLOCK_SIZE) * stride_kv_slot + h[:, None] * stride_kv_head + d[None, :])
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatters k, v [T, Hkv, D] into kv_cache's slots (block_id * block_size + offset; < 0: skip) of one layer."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(5) == 1
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        layer,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=kv_cache.shape[3],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def write_kv_reference(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = kv_cache.shape[3]
    kv_cache[slots // block_size, layer, :, slots % block_size] = torch.stack((k[keep], v[keep]), 1).to(kv_cache.dtype)

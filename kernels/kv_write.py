"""Writes one step's keys and values into the paged KV cache of one layer, in one launch. An FP8 cache stores
x / scale (per layer, one scale for K and one for V) saturated to e4m3's range."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, kv_ptr, slot_mapping_ptr, kv_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv_block, stride_kv_layer, stride_kv_kv, stride_kv_slot, stride_kv_head,
    layer,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8_KV: tl.constexpr,
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
    if FP8_KV:
        k = fp8_quantize(k, tl.load(kv_scale_ptr))
        v = fp8_quantize(v, tl.load(kv_scale_ptr + 1))
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_quantize(x, scale):
    """x / scale in float32 (correctly rounded, as torch divides), saturated to float8 e4m3's finite range and
    rounded to its grid (nearest, ties to even), so that the cast to e4m3 that follows is exact. Rounding here
    rather than in the cast: Triton's CPU interpreter casts a value that rounds up to a power of two one binade
    too low."""
    q = tl.math.div_rn(x.to(tl.float32), scale)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    a = tl.abs(q)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # e4m3: subnormal below 2^-6
    # Adding 2^(exponent + 20) leaves float32 a step of 2^(exponent - 3), e4m3's step at this magnitude.
    magic = ((exponent + 147) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    sign = q.to(tl.int32, bitcast=True) & -2147483648  # kept as is, so -0.0 and tiny negatives stay -0.0
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scale: torch.Tensor | None = None) -> None:
    """Scatters k, v [T, Hkv, D] into kv_cache's slots (block_id * block_size + offset; < 0: skip) of one layer.
    An FP8 (float8_e4m3fn) cache takes kv_scale: float32 [2], this layer's K and V scales."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(5) == 1
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (kv_scale is not None and kv_scale.dtype == torch.float32), "an FP8 cache needs kv_scale"
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, kv_scale if fp8 else slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        layer,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=kv_cache.shape[3], FP8_KV=fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def write_kv_reference(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    from baton.engine.attention import write_kv as write_kv_torch

    keep = slot_mapping >= 0
    write_kv_torch(kv_cache, layer, k[keep], v[keep], slot_mapping[keep].long(), kv_scale)

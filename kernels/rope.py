"""Rotary position embedding (rotate-half convention) applied in place to q and k in one launch; optionally the
same launch also writes the rotated k and v into their slots of the paged KV cache (one kernel instead of two
per layer: at decode batch 1 a step is bound by kernel count as much as by bytes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.kv_write import fp8_quantize


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    v_ptr, kv_ptr, slot_mapping_ptr, kv_scale_ptr, stride_vt, stride_vh,
    stride_kv_block, stride_kv_layer, stride_kv_kv, stride_kv_slot, stride_kv_head, layer,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_KV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    q_mask = (hq[:, None] < NUM_Q_HEADS) & i_mask[None, :]
    q1_ptrs = q_ptr + t * stride_qt + hq[:, None] * stride_qh + i[None, :]
    q1 = tl.load(q1_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q1_ptrs + HALF, mask=q_mask, other=0.0).to(tl.float32)
    tl.store(q1_ptrs, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q1_ptrs + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)

    hk = tl.arange(0, BLOCK_HK)
    k_mask = (hk[:, None] < NUM_K_HEADS) & i_mask[None, :]
    k1_ptrs = k_ptr + t * stride_kt + hk[:, None] * stride_kh + i[None, :]
    k1 = tl.load(k1_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptrs + HALF, mask=k_mask, other=0.0).to(tl.float32)
    k1r = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
    k2r = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
    tl.store(k1_ptrs, k1r, mask=k_mask)
    tl.store(k1_ptrs + HALF, k2r, mask=k_mask)
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        w_mask = k_mask & (slot >= 0)  # slot < 0: a padded token of a graph batch, nothing to write
        dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_kv_block + layer * stride_kv_layer
               + (slot % BLOCK_SIZE) * stride_kv_slot + hk[:, None] * stride_kv_head + i[None, :])
        v1_ptrs = v_ptr + t * stride_vt + hk[:, None] * stride_vh + i[None, :]
        v1 = tl.load(v1_ptrs, mask=w_mask)
        v2 = tl.load(v1_ptrs + HALF, mask=w_mask)
        if FP8_KV:  # k as rotated and rounded to k's dtype, as the separate write would read it back
            k_scale = tl.load(kv_scale_ptr)
            v_scale = tl.load(kv_scale_ptr + 1)
            k1r, k2r = fp8_quantize(k1r, k_scale), fp8_quantize(k2r, k_scale)
            v1, v2 = fp8_quantize(v1, v_scale), fp8_quantize(v2, v_scale)
        tl.store(dst, k1r.to(kv_ptr.dtype.element_ty), mask=w_mask)
        tl.store(dst + HALF, k2r.to(kv_ptr.dtype.element_ty), mask=w_mask)
        tl.store(dst + stride_kv_kv, v1.to(kv_ptr.dtype.element_ty), mask=w_mask)
        tl.store(dst + stride_kv_kv + HALF, v2.to(kv_ptr.dtype.element_ty), mask=w_mask)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin caches [max_positions, D/2], computed as engine/model.py's Rotary does per step."""
    freqs = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq[None, :].float()
    return freqs.cos(), freqs.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, kv: tuple | None = None) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place by the angles of positions [T] (cos, sin: [max_pos, D/2]).
    kv = (v, kv_cache, layer, slot_mapping) or (..., kv_scale): also writes the rotated k and v into the cache's
    slots (as kernels/kv_write.py does; slot < 0 is skipped; an FP8 cache takes kv_scale, float32 [2]), in the same
    launch."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = head_dim // 2
    assert head_dim % 2 == 0 and k.shape[2] == head_dim and cos.shape[1] == half and sin.shape[1] == half
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    if num_tokens == 0:
        return
    fp8 = False
    if kv is not None:
        v, kv_cache, layer, slot_mapping, kv_scale = (*kv, None)[:5]
        assert v.shape == k.shape and v.stride(2) == 1 and kv_cache.stride(5) == 1
        fp8 = kv_cache.dtype == torch.float8_e4m3fn
        assert not fp8 or (kv_scale is not None and kv_scale.dtype == torch.float32), "an FP8 cache needs kv_scale"
        kv_strides = [kv_cache.stride(d) for d in range(5)]
        block_size = kv_cache.shape[3]
    else:
        v, kv_cache, layer, slot_mapping, kv_strides, block_size = k, k, 0, positions, [0] * 5, 1
    if not fp8:
        kv_scale = positions  # never read
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        v, kv_cache, slot_mapping, kv_scale, v.stride(0), v.stride(1), *kv_strides, layer,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half), WRITE_KV=kv is not None, BLOCK_SIZE=block_size, FP8_KV=fp8,
        num_warps=4,
    )


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """engine/model.py's apply_rope on q and k (new tensors), with cos/sin taken from the caches."""
    cos_t = torch.cat((cos[positions], cos[positions]), dim=-1).to(q.dtype)[:, None, :]
    sin_t = torch.cat((sin[positions], sin[positions]), dim=-1).to(q.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos_t + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin_t

    return rotate(q), rotate(k)

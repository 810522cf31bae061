"""Pieces both paged attention kernels (prefill and decode) share: how the query and the cached keys and values
meet, for a cache in the model's dtype or in FP8 (float8_e4m3fn, read as value * the layer's scale)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scaled_query(q, qk_scale, kv_ptr, kv_scale_ptr, UPCAST: tl.constexpr, FP8_KV: tl.constexpr):
    """(q * qk_scale in the dtype the dot products take, K's scale for the float32 scores). qk_scale has log2(e)
    folded in: the softmax uses exp2. An FP8 cache is met in fp16: e4m3 -> fp16 is one instruction on sm89+ (to bf16
    it is several) and fp16 keeps 3 more mantissa bits than bf16. UPCAST (the CPU interpreter): float32."""
    q = q.to(tl.float32) * qk_scale
    k_scale = 1.0
    if FP8_KV:
        k_scale = tl.load(kv_scale_ptr)
        if not UPCAST:
            q = q.to(tl.float16)
    elif not UPCAST:
        q = q.to(kv_ptr.dtype.element_ty)
    return q, k_scale


@triton.jit
def upcast_kv(k, v, q, UPCAST: tl.constexpr, FP8_KV: tl.constexpr):
    """Loaded keys and values in the query's dtype (every e4m3 value is exact in fp16), or float32 under UPCAST."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    elif FP8_KV:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    return k, v

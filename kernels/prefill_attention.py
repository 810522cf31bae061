"""Causal attention for prefill chunks of several requests, every key read from the paged KV cache.

Covers prefix-cache hits and chunked prefill: a chunk's queries are the last q_len positions of its context.
An FP8 cache (float8_e4m3fn) reads as value * the layer's scale: K's scale multiplies the float32 scores, V's the
output, and the keys and values are upcast exactly to fp16 (float32 in the interpreter), as in
paged_decode_attention.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.attention_common import scaled_query, upcast_kv

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, q_pos, kv_base, table, k_begin, k_end, lo, hi, window, k_scale,
    stride_kv_block, stride_kv_kv, stride_kv_slot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, FP8_KV: tl.constexpr,
):
    """Online softmax over key tiles [k_begin, k_end); MASKED tiles may hold keys some rows must not see."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for k0 in range(k_begin, k_end, BLOCK_N):
        k_pos = k0 + n
        if MASKED:
            k_valid = (k_pos >= lo) & (k_pos < hi)
        else:
            k_valid = k_pos >= 0
        block_id = tl.load(table + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        rows = block_id.to(tl.int64) * stride_kv_block + (k_pos % BLOCK_SIZE) * stride_kv_slot
        kv_mask = k_valid[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(kv_base + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_base + stride_kv_kv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        k, v = upcast_kv(k, v, q, UPCAST, FP8_KV)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if FP8_KV:
            s = s * k_scale  # s = q . (k * k_scale), scaled in float32
        if MASKED:
            attend = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if window > 0:
                attend &= k_pos[None, :] > q_pos[:, None] - window
            s = tl.where(attend, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at zero
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


# Not specialized on the request count nor the block-table width: Triton compiles a variant for an integer equal to 1
# and for one divisible by 16, so the first step that mixed a prompt chunk with other requests (count 2+, width
# 257) compiled a kernel in the middle of serving (a 3.4 s stall at TTFT p90 on the H200).
@triton.jit(do_not_specialize=["num_requests", "stride_bt"])
def _prefill_kernel(
    q_ptr, kv_ptr, out_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, kv_scale_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv_block, stride_kv_layer, stride_kv_kv, stride_kv_slot, stride_kv_head,
    stride_bt,
    num_requests, layer, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)

    # Which request this tile belongs to: count the requests whose tiles all come before it. The grid has
    # one spare tile per request (each may end in a partial tile), so spare programs find none and leave.
    r_idx = tl.arange(0, BLOCK_R)
    starts = tl.load(cu_seqlens_ptr + r_idx, mask=r_idx < num_requests, other=0)
    ends = tl.load(cu_seqlens_ptr + r_idx + 1, mask=r_idx < num_requests, other=0)
    tiles_end = tl.cumsum(tl.cdiv(ends - starts, BLOCK_M), 0)
    req = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    if req < num_requests:
        own = r_idx == req
        q_start = tl.sum(tl.where(own, starts, 0), 0)
        q_len = tl.sum(tl.where(own, ends - starts, 0), 0)
        m_start = (tile - tl.sum(tl.where(own, tiles_end, 0), 0) + tl.cdiv(q_len, BLOCK_M)) * BLOCK_M
        ctx = tl.load(context_lens_ptr + req)

        m = m_start + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        io_mask = (m < q_len)[:, None] & (d < HEAD_DIM)[None, :]
        q_pos = ctx - q_len + m
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head * stride_qh + d[None, :], mask=io_mask,
                    other=0.0)
        q, k_scale = scaled_query(q, qk_scale, kv_ptr, kv_scale_ptr, UPCAST, FP8_KV)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # Keys [lo, hi) are all that any row of the tile sees. Key tiles in [full_lo, full_hi) are seen
        # whole by every row, so they skip the masks; the tiles before (window edge) and after (diagonal)
        # are masked.
        q_first = ctx - q_len + m_start
        hi = tl.minimum(q_first + BLOCK_M, ctx)
        lo = tl.where(window > 0, tl.maximum(q_first - window + 1, 0), 0)
        full_lo = tl.where(window > 0, tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N, 0)
        full_hi = tl.maximum((q_first + 1) // BLOCK_N * BLOCK_N, full_lo)
        kv_base = kv_ptr + layer * stride_kv_layer + (head // GROUP) * stride_kv_head
        table = block_tables_ptr + req * stride_bt
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, kv_base, table, lo // BLOCK_N * BLOCK_N, full_lo,
                                     lo, hi, window, k_scale, stride_kv_block, stride_kv_kv, stride_kv_slot,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, UPCAST, FP8_KV)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, kv_base, table, full_lo, full_hi,
                                     lo, hi, window, k_scale, stride_kv_block, stride_kv_kv, stride_kv_slot,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, UPCAST, FP8_KV)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, kv_base, table, full_hi, hi,
                                     lo, hi, window, k_scale, stride_kv_block, stride_kv_kv, stride_kv_slot,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, UPCAST, FP8_KV)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if FP8_KV:
            out = out * tl.load(kv_scale_ptr + 1)  # sum p (v * v_scale) = v_scale * sum p v
        tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D], flat over R requests (cu_seqlens_q [R+1] int32), over the paged cache.

    context_lens [R] int32 counts each request's cached tokens after this chunk was written; its queries are
    the last q_len of them. block_tables [R, max_blocks] int32. Returns out [T, Hq, D] in q's dtype. An FP8
    (float8_e4m3fn) cache takes kv_scale: float32 [2], the layer's K and V scales.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_requests = context_lens.shape[0]
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and kv_cache.stride(5) == 1
    assert block_tables.stride(1) == 1 and cu_seqlens_q.shape[0] == num_requests + 1
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (kv_scale is not None and kv_scale.dtype == torch.float32), "an FP8 cache needs kv_scale"
    if out is None:
        out = torch.empty_like(q)
    assert out.stride(2) == 1
    grid = (triton.cdiv(num_tokens, block_m) + num_requests, num_heads)
    _prefill_kernel[grid](
        q, kv_cache, out, cu_seqlens_q, context_lens, block_tables, kv_scale if fp8 else context_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        num_requests, layer, scale * _LOG2E, sliding_window or 0,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(num_requests)),
        UPCAST=q.device.type != "cuda",  # the CPU interpreter gets bf16 arithmetic wrong
        FP8_KV=fp8, num_warps=4, num_stages=3,
    )
    return out


def prefill_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, one request at a time, in float32; an FP8 cache's values times kv_scale (K, V)."""
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for r, ctx in enumerate(context_lens.tolist()):
        qs = q[cu[r]: cu[r + 1]].float()
        pages = block_tables[r, : triton.cdiv(ctx, block_size)].long()
        kv = kv_cache[pages, layer].float()  # [pages, 2, block_size, Hkv, D]
        if kv_cache.dtype == torch.float8_e4m3fn:
            kv = kv * kv_scale.view(1, 2, 1, 1, 1)
        k, v = (kv[:, i].flatten(0, 1)[:ctx] for i in (0, 1))
        q_pos = torch.arange(ctx - qs.shape[0], ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != num_kv_heads)
        out[cu[r]: cu[r + 1]] = o.transpose(0, 1).to(q.dtype)
    return out

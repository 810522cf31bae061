"""Flash-decoding over the paged KV cache: one query token per request, split-K over the context, then a merge.

The grid is fixed at (batch, kv_heads, num_splits) so that a decode step can be captured in a CUDA graph.
An FP8 cache (float8_e4m3fn) reads as value * the layer's scale: K's scale multiplies the float32 scores, V's the
output, and the keys and values are upcast exactly to fp16 (one instruction from e4m3 on sm89+, where bf16 takes
several; float32 in the interpreter), so the query and probabilities meet them in fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.attention_common import scaled_query, upcast_kv
from baton.kernels.pdl import launch_dependents, pdl_enabled

_LOG2E = 1.4426950408889634


def pick_num_splits(batch_size: int, num_kv_heads: int, num_sms: int = 132, max_splits: int = 32) -> int:
    """Splits per (request, kv head) so that the split kernel has about two programs per SM.

    On an H200 (Llama-3-8B shapes) fewer programs leave bandwidth unused, more only add merge work.
    """
    return max(1, min(max_splits, triton.cdiv(2 * num_sms, batch_size * num_kv_heads)))


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr, kv_scale_ptr,
    out_ptr, counter_ptr, stride_ob, stride_oh,
    stride_qb, stride_qh,
    stride_kv_block, stride_kv_layer, stride_kv_kv, stride_kv_slot, stride_kv_head,
    stride_bt,
    layer, qk_scale, window,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, FP8_KV: tl.constexpr, MERGE: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    launch_dependents(PDL)  # the next kernel (with PDL: the o projection) may start reading its weights
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    ctx = tl.load(context_lens_ptr + b)
    # Keys attended: [lo, ctx). Splits share out the pages that hold them, so each split starts on a page.
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    first_page = lo // BLOCK_SIZE
    end_page = tl.cdiv(ctx, BLOCK_SIZE)
    pages_per_split = tl.cdiv(end_page - first_page, num_splits)
    page_start = first_page + split * pages_per_split
    page_stop = tl.minimum(page_start + pages_per_split, end_page)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q, k_scale = scaled_query(q, qk_scale, kv_ptr, kv_scale_ptr, UPCAST, FP8_KV)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    kv_base = kv_ptr + layer * stride_kv_layer + kv_head * stride_kv_head
    n = tl.arange(0, BLOCK_N)
    for tok0 in range(page_start * BLOCK_SIZE, page_stop * BLOCK_SIZE, BLOCK_N):
        tok = tok0 + n
        valid = (tok >= lo) & (tok < ctx) & (tok < page_stop * BLOCK_SIZE)
        block_id = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=valid, other=0)
        rows = block_id.to(tl.int64) * stride_kv_block + (tok % BLOCK_SIZE) * stride_kv_slot
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_base + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_base + stride_kv_kv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        k, v = upcast_kv(k, v, q, UPCAST, FP8_KV)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if FP8_KV:
            s = s * k_scale  # s = q . (k * k_scale), scaled in float32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # An empty split (short context) leaves l_i = 0: it writes zeros and lse = -inf, which the merge ignores.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FP8_KV:
        out = out * tl.load(kv_scale_ptr + 1)  # sum p (v * v_scale) = v_scale * sum p v
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if MERGE == 0:  # one split: this program's output is the answer
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # base 2, like m_i
        row = (b * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=gd_mask)
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        if MERGE == 1:
            # The last split of (request, KV head) to finish merges all of them: no second kernel. Its stores
            # are published by the barrier + release-acquire count; it reads the others' past L1 (.cg).
            tl.debug_barrier()
            counter = counter_ptr + b * tl.num_programs(1) + kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call or replay
                _merge_group(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, b, kv_head,
                             GROUP * tl.num_programs(1), num_splits, GROUP, BLOCK_S, HEAD_DIM, BLOCK_D)


@triton.jit
def _merge_group(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, b, kv_head, num_heads, num_splits,
                 GROUP: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    for gi in tl.static_range(GROUP):
        h = kv_head * GROUP + gi
        row = (b * num_heads + h) * num_splits + s
        lse = tl.load(part_lse_ptr + row, mask=s < num_splits, other=float("-inf"), cache_modifier=".cg")
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m)))
        mask = (s[:, None] < num_splits) & (d[None, :] < HEAD_DIM)
        parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0,
                        cache_modifier=".cg")
        total = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    launch_dependents(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (b * tl.num_programs(1) + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    # A request with no keys at all (context 0: a padded slot of a graph batch) gets zeros, not NaN.
    w = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m)))
    mask = (s[:, None] < num_splits) & (d[None, :] < HEAD_DIM)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    out: torch.Tensor | None = None,
    partial_out: torch.Tensor | None = None,
    partial_lse: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    fused_merge: bool = False,
) -> torch.Tensor:
    """Attention of q [B, Hq, D] (one token per request) over each request's first context_lens[b] cached keys.

    block_tables [B, max_blocks] and context_lens [B] are int32. partial_out [B, Hq, num_splits, D] and
    partial_lse [B, Hq, num_splits] (float32) are scratch; pass them and out [B, Hq, D] preallocated to
    capture the call in a CUDA graph. A request with context_lens 0 gets zeros. An FP8 (float8_e4m3fn) cache
    takes kv_scale: float32 [2], the layer's K and V scales. block_n (keys per loop step, a multiple of the
    page size), num_warps and num_stages tune the split kernel (bench/decode_attention.py sweeps them).
    fused_merge: the last split of each (request, KV head) merges the partials itself (a zeroed int32 counter per
    (request, KV head), kept per device and reset by that program), instead of a second kernel; one split writes
    out directly either way. Off by default: correct on an H200 (repeated and racing calls), but slower there at
    batch 1 (split kernel 0.367 ms per 32-layer step against 0.166 + 0.076 ms for split + merge kernels): the last
    program's serial merge sits on the critical path.
    """
    batch, num_heads, head_dim = q.shape
    _, _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and kv_cache.stride(5) == 1
    assert block_tables.stride(1) == 1
    group = num_heads // num_kv_heads
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (kv_scale is not None and kv_scale.dtype == torch.float32), "an FP8 cache needs kv_scale"
    if out is None:
        out = torch.empty_like(q)
    if partial_out is None:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    if partial_lse is None:
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    assert partial_out.is_contiguous() and partial_lse.is_contiguous() and out.stride(2) == 1
    block_d = triton.next_power_of_2(head_dim)
    merge = 0 if num_splits == 1 else (1 if fused_merge else 2)
    counters = _counters(q.device, batch * num_kv_heads) if merge == 1 else context_lens
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, context_lens, partial_out, partial_lse, kv_scale if fp8 else partial_lse,
        out, counters, out.stride(0), out.stride(1),
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        layer, scale * _LOG2E, sliding_window or 0,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=max(block_n or 64, block_size),
        UPCAST=q.device.type != "cuda",  # the CPU interpreter gets bf16 arithmetic wrong
        FP8_KV=fp8, MERGE=merge, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), PDL=pdl_enabled(),
        num_warps=num_warps, num_stages=num_stages,
    )
    if merge == 2:
        _decode_merge_kernel[(batch, num_heads)](
            partial_out, partial_lse, out, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d, PDL=pdl_enabled(),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, at least n, one set per device; every fused-merge call leaves them zero again.
    Allocated generously once, so that a CUDA graph capture never has to grow them."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return buf


def paged_decode_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, one request at a time, softmax in float32; an FP8 cache's values times kv_scale (K, V)."""
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        lo = max(0, ctx - sliding_window) if sliding_window else 0
        if ctx == 0:
            continue
        pages = block_tables[b, : triton.cdiv(ctx, block_size)].long()
        kv = kv_cache[pages, layer].float()  # [pages, 2, block_size, Hkv, D]
        if kv_cache.dtype == torch.float8_e4m3fn:
            kv = kv * kv_scale.view(1, 2, 1, 1, 1)
        k = kv[:, 0].flatten(0, 1)[lo:ctx].repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = kv[:, 1].flatten(0, 1)[lo:ctx].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float() * scale, k)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out

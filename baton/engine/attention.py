"""Paged attention in plain torch, the CPU backend (the GPU backend is attention_triton.py, over kernels/).

The KV cache is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; block-major,
so one block of one request (all layers, K and V) is a single contiguous span that transports move whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.engine.config import FP8_KV_DTYPE

FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Queries of up to this many tokens after cached ones run as decode rows (1 + the most proposed tokens verified).
DECODE_ROWS_MAX = 17


@dataclass
class SeqSlice:
    """One request's share of a flat batch: its query tokens and the KV context they attend to."""

    query_start: int
    query_len: int
    context_len: int  # tokens in the cache after this step's writes, including the query tokens
    block_table: torch.Tensor  # [num_blocks_used] int64


@dataclass
class DecodeBatch:
    """Requests with exactly one query token this step, packed so that one attention call serves them all.

    Each request's context is gathered into a row padded to the longest one; key_bias is -inf on the
    padding (and on what a sliding window excludes), so a row computes exactly its own request's attention.
    """

    token_index: torch.Tensor | None  # [n] int64: where each query token sits in the flat batch; None: 0..n-1
    kv_rows: torch.Tensor  # [n * 2 * max_blocks] int64: rows of the (block, layer, K|V) cache view for layer 0
    key_bias: torch.Tensor  # [n, 1, 1, max_blocks * block_size] float: 0 where attended, -inf elsewhere


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset for each new token
    seqs: list[SeqSlice]  # requests with several query tokens (prefill chunks), attended one by one
    block_size: int
    decode: DecodeBatch | None = None

    def write_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 kv_scale: torch.Tensor | None = None) -> None:
        write_kv(kv_cache, layer, k, v, self.slot_mapping, kv_scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int,
               sliding_window: int | None, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """k, v: this step's (already in the cache, read from there). kv_scale: an FP8 cache's (k, v) scales."""
        return paged_attention(q, kv_cache, layer, self, sliding_window, kv_scale)


def build_batch(
    queries: list[tuple[int, int, list[int]]], kv_cache: torch.Tensor, sliding_window: int | None
) -> AttentionBatch:
    """queries: (first position, query tokens, block table) per request, in flat-batch order."""
    num_layers, block_size = kv_cache.shape[1], kv_cache.shape[3]
    device = kv_cache.device
    slots: list[int] = []
    seqs: list[SeqSlice] = []
    decode_index: list[int] = []
    decode_lens: list[int] = []
    decode_tables: list[list[int]] = []
    for start, n, table in queries:
        context_len = start + n
        used = table[: -(-context_len // block_size)]
        if n == 1 or (start > 0 and n <= DECODE_ROWS_MAX):
            # A few tokens after cached ones (speculative verification): one decode row each, causal by length.
            for p in range(start, context_len):
                decode_index.append(len(slots))
                decode_lens.append(p + 1)
                decode_tables.append(used)
                slots.append(table[p // block_size] * block_size + p % block_size)
            continue
        seqs.append(SeqSlice(len(slots), n, context_len, torch.tensor(used, dtype=torch.long, device=device)))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, context_len))
    decode = None
    if decode_index:
        width = max(len(t) for t in decode_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=device)
        k_or_v = torch.arange(2, device=device)[None, :, None]
        kv_rows = (tables[:, None, :] * (num_layers * 2) + k_or_v).reshape(-1)
        lens = torch.tensor(decode_lens, dtype=torch.long, device=device)[:, None]
        k_pos = torch.arange(width * block_size, device=device)[None, :]
        attended = k_pos < lens
        if sliding_window is not None:
            attended &= k_pos >= lens - sliding_window
        # An additive float mask: SDPA on CPU is several times slower with a boolean one, same result.
        mask_dtype = torch.float32 if kv_cache.dtype == FP8_KV_DTYPE else kv_cache.dtype
        key_bias = torch.zeros(attended.shape, dtype=mask_dtype, device=device)
        key_bias.masked_fill_(~attended, float("-inf"))
        index = None if len(decode_index) == len(slots) else torch.tensor(decode_index, dtype=torch.long,
                                                                           device=device)
        decode = DecodeBatch(index, kv_rows, key_bias[:, None, None, :])
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    return AttentionBatch(slot_mapping=slot_mapping, seqs=seqs, block_size=block_size, decode=decode)


def allocate_kv_cache(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str | torch.device,
) -> torch.Tensor:
    return torch.zeros(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache stores for x: x / scale in float32, saturated to e4m3's range, rounded to nearest even."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What an FP8 cache's x reads as: float32 times the scale, in dtype."""
    return (x.float() * scale).to(dtype)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scale: torch.Tensor | None = None) -> None:
    """Scatters this step's keys/values ([tokens, kv_heads, head_dim]) into their cache slots. An FP8 cache
    takes kv_scale, float32 [2]: K's and V's scale of this layer."""
    block_size = kv_cache.shape[3]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    kv = torch.stack((k, v), dim=1)
    if kv_cache.dtype == FP8_KV_DTYPE:
        kv = quantize_kv(kv, kv_scale.view(1, 2, 1, 1))
    kv_cache[blocks, layer, :, offsets] = kv.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, context_len: int):
    """One request's keys and values for the first context_len positions: ([ctx, H, D], [ctx, H, D])."""
    kv = kv_cache[block_table, layer]  # [nb, 2, block_size, H, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:context_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:context_len]
    return k, v


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: AttentionBatch, sliding_window: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each request's query tokens over its cached context. q: [tokens, heads, head_dim]."""
    d = batch.decode
    if d is not None and d.token_index is None:
        return _decode_attention(q, kv_cache, layer, d, kv_scale)  # a decode-only step: the common case
    out = torch.empty_like(q)
    if d is not None:
        out[d.token_index] = _decode_attention(q[d.token_index], kv_cache, layer, d, kv_scale)
    for s in batch.seqs:
        k, v = gather_kv(kv_cache, layer, s.block_table, s.context_len)
        if kv_cache.dtype == FP8_KV_DTYPE:
            k, v = dequantize_kv(k, kv_scale[0], q.dtype), dequantize_kv(v, kv_scale[1], q.dtype)
        qs = q[s.query_start : s.query_start + s.query_len]
        mask = None
        is_causal = False
        first_pos = s.context_len - s.query_len
        if sliding_window is not None and s.context_len > sliding_window:
            mask = _causal_mask(first_pos, s.query_len, s.context_len, sliding_window, q.device)
        elif first_pos == 0:
            is_causal = True
        else:
            mask = _causal_mask(first_pos, s.query_len, s.context_len, None, q.device)
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            k.to(q.dtype).transpose(0, 1).unsqueeze(0),
            v.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=True,
        )
        out[s.query_start : s.query_start + s.query_len] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, d: DecodeBatch,
                      kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [n, heads, head_dim], one query token per request; returns the same shape."""
    n, heads, head_dim = q.shape
    num_blocks, num_layers, _, block_size, kv_heads, _ = kv_cache.shape
    # One row per (block, layer, K|V) is a contiguous span, so index_select copies whole spans: several times
    # faster than advanced indexing, and K and V of every request come out in a single call.
    rows = kv_cache.view(num_blocks * num_layers * 2, -1).index_select(0, d.kv_rows + 2 * layer)
    kv = rows.view(n, 2, -1, kv_heads, head_dim).transpose(2, 3)  # [n, 2, H, width * block_size, D]
    if kv_cache.dtype == FP8_KV_DTYPE:
        kv = dequantize_kv(kv, kv_scale.view(1, 2, 1, 1, 1), q.dtype)
    else:
        kv = kv.to(q.dtype)
    mask = d.key_bias if d.key_bias.dtype == q.dtype else d.key_bias.to(q.dtype)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[:, 0], kv[:, 1], attn_mask=mask, enable_gqa=True)
    return o.squeeze(2)


def _causal_mask(first_pos: int, query_len: int, context_len: int, window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(first_pos, first_pos + query_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask

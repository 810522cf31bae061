"""Paged attention in plain torch: the obviously-right reference that GPU kernels are tested against.

The KV cache is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; block-major,
so one block of one request (all layers, K and V) is a single contiguous span that transports move whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSlice:
    """One request's share of a flat batch: its query tokens and the KV context they attend to."""

    query_start: int
    query_len: int
    context_len: int  # tokens in the cache after this step's writes, including the query tokens
    block_table: torch.Tensor  # [num_blocks_used] int64


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset for each new token
    seqs: list[SeqSlice]
    block_size: int


def allocate_kv_cache(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str | torch.device,
) -> torch.Tensor:
    return torch.zeros(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatters this step's keys/values ([tokens, kv_heads, head_dim]) into their cache slots."""
    block_size = kv_cache.shape[3]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    kv_cache[blocks, layer, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, context_len: int):
    """One request's keys and values for the first context_len positions: ([ctx, H, D], [ctx, H, D])."""
    kv = kv_cache[block_table, layer]  # [nb, 2, block_size, H, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:context_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:context_len]
    return k, v


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: AttentionBatch, sliding_window: int | None = None
) -> torch.Tensor:
    """Causal attention of each request's query tokens over its cached context. q: [tokens, heads, head_dim]."""
    out = torch.empty_like(q)
    for s in batch.seqs:
        k, v = gather_kv(kv_cache, layer, s.block_table, s.context_len)
        qs = q[s.query_start : s.query_start + s.query_len]
        mask = None
        is_causal = False
        first_pos = s.context_len - s.query_len
        if sliding_window is not None and s.context_len > sliding_window:
            mask = _causal_mask(first_pos, s.query_len, s.context_len, sliding_window, q.device)
        elif s.query_len > 1:
            if first_pos == 0:
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


def _causal_mask(first_pos: int, query_len: int, context_len: int, window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(first_pos, first_pos + query_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask

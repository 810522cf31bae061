"""Paged attention on the GPU through kernels/: flash-decoding for decode steps (graph-capturable), the paged
prefill kernel for chunks that follow cached tokens, and FlashAttention (SDPA) for prompts that start fresh."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.kernels.kv_write import write_kv
from baton.kernels.paged_decode_attention import paged_decode_attention, pick_num_splits
from baton.kernels.prefill_attention import prefill_attention


@dataclass
class TritonBatch:
    slot_mapping: torch.Tensor  # [tokens] int64; < 0: padding, not written
    block_tables: torch.Tensor  # [requests, max_blocks] int32
    context_lens: torch.Tensor  # [requests] int32: tokens in the cache once this step's are written
    scale: float
    num_splits: int = 1  # decode: splits of each context (the grid is fixed for a CUDA graph)
    decode_only: bool = True
    cu_seqlens_q: torch.Tensor | None = None  # [requests + 1] int32 (steps with prefill chunks)
    fresh: list[tuple[int, int]] | None = None  # (first token, length) when every request starts at position 0

    def write_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 kv_scale: torch.Tensor | None = None) -> None:
        write_kv(kv_cache, layer, k, v, self.slot_mapping, kv_scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int,
               sliding_window: int | None, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """kv_scale: an FP8 cache's (K, V) scales of this layer."""
        if self.decode_only:
            return paged_decode_attention(q, kv_cache, layer, self.block_tables, self.context_lens, self.scale,
                                          sliding_window, self.num_splits, kv_scale=kv_scale)
        if self.fresh is not None and sliding_window is None:
            out = torch.empty_like(q)
            # No cached prefix: FlashAttention on this step's own k and v (unquantized even with an FP8 cache, as
            # vLLM's prefill reads them).
            for start, n in self.fresh:
                # 4-D [1, heads, tokens, dim]: SDPA's flash backend takes no 3-D input (it would fall back to
                # the math backend, which materialises the whole score matrix).
                o = F.scaled_dot_product_attention(
                    q[start:start + n].transpose(0, 1)[None], k[start:start + n].transpose(0, 1)[None],
                    v[start:start + n].transpose(0, 1)[None], is_causal=True, scale=self.scale, enable_gqa=True)
                out[start:start + n] = o[0].transpose(0, 1)
            return out
        return prefill_attention(q, kv_cache, layer, self.cu_seqlens_q, self.context_lens, self.block_tables,
                                 self.scale, sliding_window, kv_scale=kv_scale)


def build_triton_batch(queries: list[tuple[int, int, list[int]]], block_size: int, scale: float,
                       device: torch.device, num_sms: int, num_kv_heads: int) -> TritonBatch:
    """queries: (first position, query tokens, block table) per request, in flat-batch order."""
    slots: list[int] = []
    lens: list[int] = []
    tables: list[list[int]] = []
    starts = [0]
    for start, n, table in queries:
        context_len = start + n
        tables.append(table[: -(-context_len // block_size)])
        lens.append(context_len)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, context_len))
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    batch = TritonBatch(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                        block_tables=block_tables,
                        context_lens=torch.tensor(lens, dtype=torch.int32, device=device), scale=scale)
    if all(n == 1 for _, n, _ in queries):
        batch.num_splits = pick_num_splits(len(queries), num_kv_heads, num_sms)
        return batch
    batch.decode_only = False
    batch.cu_seqlens_q = torch.tensor(starts, dtype=torch.int32, device=device)
    if all(start == 0 for start, _, _ in queries):
        batch.fresh = [(starts[i], n) for i, (_, n, _) in enumerate(queries)]
    return batch

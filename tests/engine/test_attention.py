"""Paged attention (batched decode path and per-request prefill path) against a position-by-position reference."""
from __future__ import annotations

import math
import random

import pytest
import torch

from baton.engine.attention import allocate_kv_cache, build_batch, paged_attention, write_kv

LAYERS, BLOCK, KV_HEADS, HEADS, DIM, NUM_BLOCKS = 3, 4, 2, 6, 8, 64


def reference(q, kv_cache, layer, start, n, table, window):
    """softmax(q k^T / sqrt(d)) v over the positions each query may see, one position at a time."""
    out = torch.empty_like(q)
    group = HEADS // KV_HEADS
    for i in range(n):
        pos = start + i
        seen = [p for p in range(pos + 1) if window is None or p > pos - window]
        k = torch.stack([kv_cache[table[p // BLOCK], layer, 0, p % BLOCK] for p in seen])  # [ctx, KVH, D]
        v = torch.stack([kv_cache[table[p // BLOCK], layer, 1, p % BLOCK] for p in seen])
        for h in range(HEADS):
            scores = (k[:, h // group] @ q[i, h]) / math.sqrt(DIM)
            out[i, h] = torch.softmax(scores.double(), 0).float() @ v[:, h // group]
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", ["decode_only", "mixed"])
def test_matches_reference_on_random_inputs(window, shape):
    rng = random.Random(f"{window}{shape}")
    torch.manual_seed(rng.randrange(2**31))
    kv_cache = allocate_kv_cache(NUM_BLOCKS, LAYERS, BLOCK, KV_HEADS, DIM, torch.float32, "cpu")
    kv_cache.normal_()  # stale random data everywhere: padding and other requests' blocks must not leak in
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    # (first position, query tokens): decode rows with contexts from 1 to several blocks, plus prefill chunks.
    queries = [(0, 1), (3, 1), (4, 1), (17, 1), (9, 1)]
    if shape == "mixed":
        queries[1:1] = [(0, 7)]
        queries.append((6, 5))
    batch_queries = []
    for start, n in queries:
        need = -(-(start + n) // BLOCK) + rng.randrange(2)  # tables may hold blocks beyond the context
        batch_queries.append((start, n, [blocks.pop() for _ in range(need)]))
    batch = build_batch(batch_queries, kv_cache, window)
    tokens = sum(n for _, n, _ in batch_queries)
    layer = 1
    q = torch.randn(tokens, HEADS, DIM)
    write_kv(kv_cache, layer, torch.randn(tokens, KV_HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM),
             batch.slot_mapping)

    out = paged_attention(q, kv_cache, layer, batch, window)

    assert (batch.decode.token_index is None) == (shape == "decode_only")
    offset = 0
    for start, n, table in batch_queries:
        expected = reference(q[offset:offset + n], kv_cache, layer, start, n, table, window)
        torch.testing.assert_close(out[offset:offset + n], expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"request at {start}+{n}: {m}")
        offset += n


def test_write_kv_touches_only_the_mapped_slots():
    kv_cache = allocate_kv_cache(8, LAYERS, BLOCK, KV_HEADS, DIM, torch.float32, "cpu").normal_()
    before = kv_cache.clone()
    batch = build_batch([(5, 1, [3, 6]), (0, 2, [1])], kv_cache, None)
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    write_kv(kv_cache, 2, k, v, batch.slot_mapping)
    for i, (blk, off) in enumerate([(6, 1), (1, 0), (1, 1)]):
        assert torch.equal(kv_cache[blk, 2, 0, off], k[i]) and torch.equal(kv_cache[blk, 2, 1, off], v[i])
        before[blk, 2, :, off] = kv_cache[blk, 2, :, off]
    assert torch.equal(kv_cache, before)

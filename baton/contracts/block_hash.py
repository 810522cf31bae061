"""Chained block hashes: the one definition shared by the engine's prefix cache and the router's index."""
from __future__ import annotations

from array import array
from typing import Sequence

import xxhash

# Seed of the chain: the first block of every prompt hashes against this parent.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash (ROOT_HASH for the first block)."""
    h = xxhash.xxh3_64()
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(array("i", token_ids).tobytes())
    return h.intdigest()


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of token_ids, chained; a partial tail block has no hash."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        out.append(parent_hash)
    return out


"""KV block allocation with reference counts, prefix caching by chained hashes, and LRU eviction.

A block is in exactly one state: free (no hash, unreferenced), cached (hashed, unreferenced, evictable in
LRU order) or in use (referenced). free + cached + in use == total, always.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from baton.contracts.block_hash import ROOT_HASH, hash_block
from baton.engine.sequence import Sequence


class KVEventSink(Protocol):
    """Receives prefix-cache changes (the worker's KV event publisher implements this)."""

    def stored(self, hashes: list[int]) -> None: ...

    def removed(self, hashes: list[int]) -> None: ...


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockStats:
    total: int
    free: int
    cached: int
    in_use: int

    @property
    def usage(self) -> float:
        return self.in_use / self.total if self.total else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 events: KVEventSink | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_lru: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        # Prompt tokens looked up in the prefix cache and found there, over every admission (as vLLM counts).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries -------------------------------------------------------------------------
    def stats(self) -> BlockStats:
        free, cached = len(self.free_ids), len(self.cached_lru)
        return BlockStats(len(self.blocks), free, cached, len(self.blocks) - free - cached)

    @property
    def num_available(self) -> int:
        return len(self.free_ids) + len(self.cached_lru)

    def cached_hashes(self) -> list[int]:
        return list(self.hash_to_block)

    def _lookup(self, parent: int, tokens: list[int]) -> tuple[int, int | None]:
        h = hash_block(parent, tokens)
        block_id = self.hash_to_block.get(h)
        # Compare the stored tokens too, so a hash collision can never return a wrong block.
        if block_id is not None and self.blocks[block_id].token_ids != tuple(tokens):
            block_id = None
        return h, block_id

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block id) of the leading cached blocks; never the whole prompt (its last token must run)."""
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        token_ids = seq.token_ids
        hits: list[tuple[int, int]] = []
        parent = ROOT_HASH
        bs = self.block_size
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            h, block_id = self._lookup(parent, token_ids[start : start + bs])
            if block_id is None:
                break
            hits.append((h, block_id))
            parent = h
        return hits

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        in_use_hits = sum(1 for _, b in hits if self.blocks[b].ref_count > 0)
        return self.num_blocks_for(seq.num_tokens) - in_use_hits <= self.num_available

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_available

    # ---- actions -------------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> None:
        """Gives seq blocks for all its tokens, reusing cached prefix blocks; sets num_computed_tokens."""
        if seq.block_table:
            raise RuntimeError(f"request {seq.request_id} already holds blocks")
        if not self.can_allocate(seq):
            raise NoFreeBlocksError(f"not enough free KV blocks for request {seq.request_id}")
        hits = self._prefix_hits(seq)
        for h, block_id in hits:
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        for _ in range(self.num_blocks_for(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free())
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        if self.enable_prefix_caching and seq.reads_prefix_cache:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Makes sure blocks cover the next num_new_tokens positions to compute."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_available:
            raise NoFreeBlocksError(f"not enough free KV blocks for request {seq.request_id}")
        for _ in range(needed):
            seq.block_table.append(self._take_free())

    def trim(self, seq: Sequence) -> None:
        """Frees trailing blocks past seq's computed tokens (speculative decoding: rejected tokens' slots)."""
        keep = self.num_blocks_for(seq.num_computed_tokens)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def register_computed(self, seq: Sequence) -> None:
        """Publishes hashes of blocks that became full and computed, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        stored: list[int] = []
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
                stored.append(h)
        if stored and self.events is not None:
            self.events.stored(stored)

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; later blocks go first into the LRU so they are evicted first."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # ---- internals -----------------------------------------------------------------------
    def _release(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached_lru[block_id] = None
                else:
                    self.free_ids.append(block_id)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.cached_lru[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        elif self.cached_lru:
            block_id = self._evict(next(iter(self.cached_lru)))
        else:
            raise NoFreeBlocksError("KV cache is full")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block_id: int) -> int:
        del self.cached_lru[block_id]
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            if self.events is not None:
                self.events.removed([block.hash])
            block.hash = block.token_ids = None
        return block_id

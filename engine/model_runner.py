"""Turns a scheduled step into flat model inputs (ids, positions, KV slots), runs the model, returns logits."""
from __future__ import annotations

import torch

from engine.attention import AttentionBatch, SeqSlice
from engine.model import CausalLM
from engine.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, device: str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Computes every scheduled token; returns logits [n_sampling, vocab] for requests that sample."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slices: list[SeqSlice] = []
        logits_indices: list[int] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            pos = range(start, start + n)
            slices.append(SeqSlice(
                query_start=len(ids),
                query_len=n,
                context_len=start + n,
                block_table=torch.tensor(table[: -(-(start + n) // bs)], dtype=torch.long, device=self.device),
            ))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if item.samples:
                logits_indices.append(len(ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        batch = AttentionBatch(slot_mapping=as_tensor(slots), seqs=slices, block_size=bs)
        return self.model(as_tensor(ids), as_tensor(positions), self.kv_cache, batch, as_tensor(logits_indices))

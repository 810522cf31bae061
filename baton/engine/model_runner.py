"""Turns a scheduled step into flat model inputs (ids, positions, KV slots), runs the model, returns logits."""
from __future__ import annotations

import torch

from baton.engine.attention import build_batch
from baton.engine.model import CausalLM
from baton.engine.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, device: str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Computes every scheduled token; returns logits [n_sampling, vocab] for requests that sample."""
        ids: list[int] = []
        positions: list[int] = []
        queries: list[tuple[int, int, list[int]]] = []
        logits_indices: list[int] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            queries.append((start, n, seq.block_table))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if item.samples:
                logits_indices.append(len(ids) - 1)
        batch = build_batch(queries, self.kv_cache, self.model.config.sliding_window)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return self.model(as_tensor(ids), as_tensor(positions), self.kv_cache, batch, as_tensor(logits_indices))

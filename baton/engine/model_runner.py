"""Turns a scheduled step into flat model inputs (ids, positions, KV slots), runs the model, returns logits.

On the GPU, decode-only steps replay a CUDA graph captured per batch-size bucket over static input buffers
filled in place (nano-vllm's order); prefill and mixed steps run eagerly."""
from __future__ import annotations

import gc
import math
from typing import Callable

import torch

from baton.engine.attention import build_batch
from baton.engine.model import CausalLM, row_invariant
from baton.engine.scheduler import ScheduledSeq
from baton.engine.sequence import PLACEHOLDER

# The most rows a row-invariant verification step has (kernels.gemv.MAX_ROWS: one gemv launch).
INVARIANT_ROWS = 8
# The previous step's sampled ids, still on the device, and the row of each request in them.
PreviousTokens = tuple[torch.Tensor, dict[str, int]]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, device: str,
                 max_num_seqs: int = 1, max_model_len: int = 0, cuda_graphs: bool = True,
                 row_invariant: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = torch.device(device)
        mc = model.config
        self.scale = mc.head_dim ** -0.5
        self.graphs: DecodeGraphs | None = None
        # Verification steps of at most this many rows run row-invariantly (EngineConfig.row_invariant_verification).
        self.invariant_rows = INVARIANT_ROWS if row_invariant and self.device.type == "cuda" else 0
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.invariant_rows:
                from baton.kernels.paged_decode_attention import pick_num_splits

                # Decode attention splits each context alike in every step of up to invariant_rows rows (one-row
                # steps and verifications): the count a full verification step wants.
                self.invariant_splits = pick_num_splits(self.invariant_rows, mc.num_kv_heads, self.num_sms)
            if cuda_graphs:
                self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len)

    def _inputs(self, scheduled: list[ScheduledSeq]):
        ids: list[int] = []
        positions: list[int] = []
        queries: list[tuple[int, int, list[int]]] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            queries.append((start, n, seq.block_table))
            first = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if item.samples:  # speculative decoding: one row per proposed token, then the bonus one
                logits_indices.extend(range(len(ids) - 1 - seq.num_draft, len(ids)))
            prompt_indices.extend(first + p - start for p in item.prompt_positions)
        return ids, positions, queries, logits_indices, prompt_indices

    def run(self, scheduled: list[ScheduledSeq], previous: PreviousTokens | None = None,
            layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Computes every scheduled token; returns logits (float32, on the model's device): one row per request
        that samples (1 + num_draft rows for one verifying proposed tokens), then one per `prompt_positions` of
        each request in order (prompt logprobs).

        A token id not known on the host yet (PLACEHOLDER: sampled by the step still in flight) is taken on the
        device from `previous`, so this step can be queued before that one's ids reach the host. `layer_done(l)`
        runs right after layer l has written its KV (eager steps only)."""
        ids, positions, queries, logits_indices, prompt_indices = self._inputs(scheduled)
        src = _sources(scheduled, ids, previous)
        if len(logits_indices) == len(ids) > len(queries) and not prompt_indices:
            # Speculative verification: every token needs its logits, so each one runs as a decode row over the keys
            # before it (a layer writes the step's KV before attending) — through the decode CUDA graphs too. In a
            # row-invariant engine (EngineConfig.row_invariant_verification), steps of up to INVARIANT_ROWS rows
            # compute each row as a one-row step does (model.row_invariant, invariant_splits): bf16 greedy output
            # then stays that of decoding without speculation, token for token.
            queries = [(start + i, 1, table) for start, n, table in queries for i in range(n)]
        if self.graphs is not None and layer_done is None and len(ids) == len(queries) and self.graphs.fits(len(ids)) \
                and len(logits_indices) == len(ids) and not prompt_indices:
            return self.graphs.replay(ids, positions, queries, previous[0] if src else None, src)
        if self.device.type == "cuda":
            from baton.engine.attention_triton import build_triton_batch

            kv_heads = self.model.config.num_kv_heads
            batch = build_triton_batch(queries, self.block_size, self.scale, self.device, self.num_sms, kv_heads)
            if self.invariant_rows and batch.decode_only and len(queries) <= self.invariant_rows:
                batch.num_splits = self.invariant_splits
        else:
            batch = build_batch(queries, self.kv_cache, self.model.config.sliding_window)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        input_ids = as_tensor(ids)
        if src is not None:
            rows = as_tensor(src)
            input_ids = torch.where(rows >= 0, previous[0][rows.clamp(min=0)], input_ids)
        with row_invariant(self.invariant_rows > 0):
            return self.model(input_ids, as_tensor(positions), self.kv_cache, batch,
                              as_tensor(logits_indices + prompt_indices), layer_done=layer_done)


def _sources(scheduled: list[ScheduledSeq], ids: list[int], previous: PreviousTokens | None) -> list[int] | None:
    """Per flat token, the row of `previous` holding its id (a PLACEHOLDER on the host), else -1; None if none."""
    if PLACEHOLDER not in ids:
        return None
    if previous is None:
        raise RuntimeError("a placeholder token id without the step that samples it")
    rows = previous[1]
    src: list[int] = []
    for item in scheduled:
        start = item.seq.num_computed_tokens
        for token in item.seq.token_ids[start:start + item.num_tokens]:
            src.append(rows[item.seq.request_id] if token == PLACEHOLDER else -1)
    return src


def graph_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always a bucket)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs, 16))
    return sorted(set(buckets + [max_num_seqs]))


class DecodeGraphs:
    """One CUDA graph per decode batch bucket. Padding rows write no KV (slot -1) and attend to nothing
    (context 0); their logits are dropped."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        from baton.engine.attention_triton import TritonBatch
        from baton.kernels.paged_decode_attention import pick_num_splits

        self.runner = runner
        self.buckets = graph_buckets(max_num_seqs)
        bmax, dev = self.buckets[-1], runner.device
        self.max_blocks = max(1, math.ceil(max_model_len / runner.block_size))
        self.ids = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.slots = torch.full((bmax,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(bmax, dtype=torch.int32, device=dev)
        self.rows = torch.arange(bmax, dtype=torch.long, device=dev)
        self.src_rows = torch.full((bmax,), -1, dtype=torch.long, device=dev)
        # Host staging in pinned memory: the copies into the static buffers don't block the host. Two sets, used
        # in turn: with async scheduling the host fills one while the device may not have read the other yet.
        self.staging = [(torch.zeros(5, bmax, dtype=torch.long, pin_memory=True),
                         torch.zeros(bmax, self.max_blocks, dtype=torch.int32, pin_memory=True)) for _ in range(2)]
        self._turn = 0
        kv_heads = runner.model.config.num_kv_heads
        # A row-invariant engine's buckets of up to invariant_rows rows split contexts alike (ModelRunner.run).
        self.batches = {b: TritonBatch(self.slots[:b], self.block_tables[:b], self.context_lens[:b], runner.scale,
                                       num_splits=runner.invariant_splits if b <= runner.invariant_rows
                                       else pick_num_splits(b, kv_heads, runner.num_sms))
                        for b in self.buckets}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def _forward(self, b: int) -> torch.Tensor:
        r = self.runner
        with row_invariant(r.invariant_rows > 0):
            return r.model(self.ids[:b], self.positions[:b], r.kv_cache, self.batches[b], self.rows[:b])

    def capture(self) -> None:
        """Largest bucket first, so the smaller graphs reuse its memory pool. The garbage collector is held off
        meanwhile: collecting another engine's pinned buffers (cudaFreeHost) inside a capture invalidates it."""
        pool = None
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for b in reversed(self.buckets):
                self._forward(b)  # compiles the kernels for this shape outside the capture
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = (graph, out)
            torch.cuda.synchronize(self.runner.device)
        finally:
            if was_enabled:
                gc.enable()

    def replay(self, ids: list[int], positions: list[int], queries, previous: torch.Tensor | None = None,
               src: list[int] | None = None) -> torch.Tensor:
        """src[i] >= 0: row i's id is previous[src[i]] (sampled by the step still in flight), read on the device."""
        n = len(ids)
        b = next(x for x in self.buckets if x >= n)
        if b not in self.graphs:
            self.capture()
        bs = self.runner.block_size
        host, tables = self.staging[self._turn]
        self._turn ^= 1
        h, t = host.numpy(), tables.numpy()  # numpy views of the pinned buffers: cheap per-row writes
        h[:, :b] = 0
        h[2, :b] = -1
        h[4, :b] = -1
        h[0, :n], h[1, :n] = ids, positions
        if src is not None:
            h[4, :n] = src
        for i, (start, _, table) in enumerate(queries):
            used = -(-(start + 1) // bs)
            h[2, i] = table[start // bs] * bs + start % bs
            h[3, i] = start + 1
            t[i, :used] = table[:used]
        self.ids[:b].copy_(host[0, :b], non_blocking=True)
        self.positions[:b].copy_(host[1, :b], non_blocking=True)
        self.slots[:b].copy_(host[2, :b], non_blocking=True)
        self.context_lens[:b].copy_(host[3, :b], non_blocking=True)
        self.block_tables[:n].copy_(tables[:n], non_blocking=True)
        if src is not None:
            rows = self.src_rows[:b]
            rows.copy_(host[4, :b], non_blocking=True)
            self.ids[:b] = torch.where(rows >= 0, previous[rows.clamp(min=0)], self.ids[:b])
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

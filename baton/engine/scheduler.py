"""Continuous batching: which requests run this step and how many tokens each, under a token budget.

Running requests go first (decodes and unfinished prefill chunks), then waiting ones are admitted while
blocks and budget last. When a running request needs a block and none is free, the most recently
admitted request is preempted and later recomputed from its tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the request's last known token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens

    @property
    def prompt_positions(self) -> range:
        """Positions in this chunk whose logits score the next prompt token and are not scored yet: only for
        requests that asked for prompt logprobs (position p scores prompt token p + 1)."""
        seq = self.seq
        if seq.params.prompt_logprobs is None:
            return range(0)
        start = max(seq.num_computed_tokens, len(seq.prompt_logprobs))  # a recompute after preemption skips them
        end = min(seq.num_computed_tokens + self.num_tokens, seq.num_prompt_tokens - 1)
        return range(start, max(start, end))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admits a request whose blocks are already allocated and filled (KV received from a prefill worker)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            # Drafts are verified whole or not at all: without room for them, the request decodes one token.
            if seq.num_draft and (n < seq.num_uncomputed or not self.blocks.can_append(seq, n)):
                seq.drop_draft()
                n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_append(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self.blocks.append_slots(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        for seq in self.running[i:]:
            seq.drop_draft()
        # Admitting new work in a step that had to preempt would only thrash the cache.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        seq.drop_draft()
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

"""The draft-model proposer: a smaller checkpoint with the target's vocabulary, with its own paged KV pool and block
manager, runs k tokens ahead of each speculating request (greedily for greedy requests, else sampling with the
request's own settings, and reporting the distribution each token came from)."""
from __future__ import annotations

import dataclasses

import torch

from baton.engine.attention import allocate_kv_cache
from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.loader import load_model
from baton.engine.model import CausalLM
from baton.engine.model_runner import ModelRunner
from baton.engine.sampler import filtered_probs
from baton.engine.scheduler import ScheduledSeq
from baton.engine.sequence import Sequence
from baton.engine.speculation import Proposal


def load_draft(config: EngineConfig, target: ModelConfig) -> tuple[CausalLM, ModelConfig]:
    """The draft checkpoint, in the target's dtype and device; refuses one whose vocabulary differs."""
    mc = ModelConfig.from_dir(config.speculative_model)
    if mc.vocab_size != target.vocab_size:
        raise ValueError(f"speculative model {config.speculative_model}: vocab_size {mc.vocab_size} differs from the "
                         f"target's {target.vocab_size} (a draft model must share the tokenizer)")
    draft_config = dataclasses.replace(config, model_dir=config.speculative_model, load_format="auto",
                                       speculative_method="off", speculative_model=None)
    return load_model(draft_config, mc), mc


def kv_block_nbytes(mc: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return mc.num_layers * 2 * block_size * mc.num_kv_heads * mc.head_dim * dtype.itemsize


class DraftModelProposer:
    def __init__(self, model: CausalLM, mc: ModelConfig, num_blocks: int, config: EngineConfig, vocab: int,
                 max_model_len: int) -> None:
        dtype = next(model.parameters()).dtype
        bs = config.block_size
        self.kv_cache = allocate_kv_cache(num_blocks, mc.num_layers, bs, mc.num_kv_heads, mc.head_dim, dtype,
                                          config.device)
        self.blocks = BlockManager(num_blocks, bs, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.kv_cache, bs, config.device, config.max_num_seqs,
                                  min(max_model_len, mc.max_position), cuda_graphs=False)
        self.max_model_len = min(max_model_len, mc.max_position)
        self.vocab = vocab
        self.device = torch.device(config.device)
        self._seed = config.seed + 1
        self._default = torch.Generator(self.device).manual_seed(self._seed)
        self._generators: dict[str, torch.Generator] = {}
        self._shadows: dict[str, Sequence] = {}  # the draft's copy of each request: its tokens and its KV blocks

    proposes_in_flight = False  # the draft runs its own forward over every id: it needs the last one known

    def expects_proposal(self, seq: Sequence) -> bool:
        return True  # a draft model always guesses

    def forget(self, request_id: str) -> None:
        shadow = self._shadows.pop(request_id, None)
        self._generators.pop(request_id, None)
        if shadow is not None:
            self.blocks.free(shadow)

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[Proposal]:
        out = [Proposal([]) for _ in requests]
        active = []
        for i, (seq, k) in enumerate(requests):
            k = min(k, self.max_model_len - seq.num_tokens)
            shadow = self._sync(seq, k) if k > 0 else None
            if shadow is not None:
                active.append((i, shadow, k))
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        for step in range(max((k for _, _, k in active), default=0)):
            batch = [(i, shadow) for i, shadow, k in active if step < k]
            scheduled = [ScheduledSeq(shadow, shadow.num_uncomputed) for _, shadow in batch]
            logits = self.runner.run(scheduled)[:, : self.vocab].float()
            tokens = logits.argmax(dim=-1)
            for row, (i, shadow) in enumerate(batch):
                shadow.num_computed_tokens = shadow.num_tokens
                params = shadow.params
                if not params.greedy:
                    q = filtered_probs(logits[row], params)
                    tokens[row] = torch.multinomial(q, 1, generator=self._generator(shadow))[0]
                    probs[i].append(q)
            for (i, shadow), token in zip(batch, tokens.tolist()):
                shadow.token_ids.append(token)
                out[i].tokens.append(token)
        for i, rows in probs.items():
            if rows:
                out[i].probs = torch.stack(rows)
        return out

    def _generator(self, shadow: Sequence) -> torch.Generator:
        seed = shadow.params.seed
        if seed is None:
            return self._default
        gen = self._generators.get(shadow.request_id)
        if gen is None:
            gen = self._generators[shadow.request_id] = torch.Generator(self.device).manual_seed(seed + self._seed)
        return gen

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The draft's copy of seq, holding seq's tokens, its KV computed for their longest common prefix with what
        the draft computed before, and blocks for the k - 1 proposed tokens it will compute; None: no room."""
        target = seq.token_ids
        shadow = self._shadows.get(seq.request_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, list(seq.prompt_ids), seq.params, token_ids=list(target))
            if not self.blocks.can_allocate(shadow):
                return None
            self.blocks.allocate(shadow)
            self._shadows[seq.request_id] = shadow
        else:
            m = min(shadow.num_computed_tokens, len(target))
            if shadow.token_ids[:m] != target[:m]:  # a rejected draft: roll back to where the two agree
                m = next(j for j in range(m) if shadow.token_ids[j] != target[j])
            shadow.token_ids = list(target)
            shadow.num_computed_tokens = m
            self.blocks.trim(shadow)
        new = shadow.num_tokens + k - 1 - shadow.num_computed_tokens
        if not self.blocks.can_append(shadow, new):
            self.forget(seq.request_id)
            return None
        self.blocks.append_slots(shadow, new)
        return shadow

"""Speculative decoding: proposers of draft tokens behind one interface (n-gram prompt lookup here, a draft model in
draft_model.py), and the rule that accepts them so that the output stays the target model's own: greedy requests
get the same tokens, sampled ones the same distribution (rejection sampling)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from baton.engine.errors import InvalidRequestError
from baton.engine.sampler import TopLogprobs, filtered_probs
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import PLACEHOLDER, Sequence


@dataclass
class Proposal:
    tokens: list[int]
    # [len(tokens), vocab]: the distribution each token was drawn from; None: a deterministic proposal.
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, requests: list[tuple[Sequence, int]]) -> list[Proposal]:
        """At most k tokens that may follow each sequence's tokens (fewer or none when it has no guess)."""
        ...

    def forget(self, request_id: str) -> None: ...

    def expects_proposal(self, seq: Sequence) -> bool:
        """Whether propose would find a guess for seq now; yes where it cannot tell more cheaply than proposing."""
        ...

    # Whether propose takes sequences that end in a PLACEHOLDER (the id the step in flight samples), guessing past
    # it: their verification step can then be queued behind that step instead of waiting for the id.
    proposes_in_flight: bool


class NgramProposer:
    """Prompt lookup: the last n tokens (n from max_n down to min_n) also occur earlier in prompt + output; propose
    what followed that occurrence. Costs no model, and wins where outputs copy their context (code edits, RAG)."""

    proposes_in_flight = True

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        # Per request: the min_n-grams ending at each position before `upto`, so that the async scheduler's check
        # of every running request, every step, costs the tokens added since (not a scan of the whole context).
        self._grams: dict[str, tuple[int, int, set[tuple[int, ...]]]] = {}  # (upto, token before it, grams)

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[Proposal]:
        # The incremental check first: the whole lookup only runs where it will find something.
        return [Proposal(self._lookup(seq.token_ids, k) if self.expects_proposal(seq) else []) for seq, k in requests]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        if tokens[-1] != PLACEHOLDER:
            return ngram_lookup(tokens, k, self.min_n, self.max_n)
        # The last id is still being sampled: the copy's next token stands in for it, and the proposal is what
        # follows. Verification feeds the real id, so a wrong guess costs acceptance, never correctness.
        return ngram_lookup(tokens[:-1], k + 1, self.min_n, self.max_n)[1:]

    def forget(self, request_id: str) -> None:
        self._grams.pop(request_id, None)

    def expects_proposal(self, seq: Sequence) -> bool:
        """Whether the tokens known so far end in a match, i.e. whether ngram_lookup would propose (an id still
        being sampled on the device is not known: the match before it stands in, as copy runs are long)."""
        tokens, n = seq.token_ids, self.min_n
        end = len(tokens)
        while end and tokens[end - 1] == PLACEHOLDER:
            end -= 1
        if end < n + 1:
            return False
        upto, before, grams = self._grams.get(seq.request_id, (n - 1, None, None))
        if grams is None or upto > end - 1 or tokens[upto - 1] != before:  # first look, or the tokens changed
            upto, grams = n - 1, set()
        for i in range(upto, end - 1):  # grams ending before the last known token
            grams.add(tuple(tokens[i - n + 1:i + 1]))
        self._grams[seq.request_id] = (end - 1, tokens[end - 2], grams)
        return tuple(tokens[end - n:end]) in grams


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The continuation of the latest earlier occurrence of the longest matching suffix; where that runs into the
    suffix itself the text is taken as periodic and the copy goes on over the proposal (as LZ77 copies overlap).

    One pass: every earlier position holding the last token is a candidate end of a match; the match lengths of all
    candidates grow together, one comparison per length (max_n small vector ops, not one scan per length)."""
    arr = np.asarray(tokens, dtype=np.int64)
    total = len(arr)
    if total < 2 or min_n > total - 1:
        return []
    ends = np.flatnonzero(arr[:-1] == arr[-1])  # candidate match ends, latest last
    if not ends.size:
        return []
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for t in range(1, min(max_n, total - 1)):
        ok = alive & (ends >= t)
        ok[ok] = arr[ends[ok] - t] == arr[total - 1 - t]
        alive = ok
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(length == best)[-1]])
    period = total - 1 - end
    out: list[int] = []
    for m in range(k):
        src = total + m - period
        out.append(int(arr[src]) if src < total else out[src - total])
    return out


@dataclass
class Verified:
    tokens: list[int]  # accepted drafts, then the target's own next token
    logprobs: list[float]
    top_logprobs: list[TopLogprobs]
    num_accepted: int


@dataclass(frozen=True)
class SpecStats:
    num_drafts: int  # verification steps that had at least one proposed token
    num_draft_tokens: int
    num_accepted_tokens: int


class Speculator:
    """Decides which running requests speculate and by how much, asks their proposer, verifies the drafts."""

    def __init__(self, default_method: str, default_tokens: int, proposers: dict[str, Proposer],
                 disable_by_batch_size: int | None = None) -> None:
        self.default_method = default_method
        self.default_tokens = default_tokens
        self.proposers = proposers
        self.disable_by_batch_size = disable_by_batch_size
        self._draft_probs: dict[str, torch.Tensor] = {}
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0

    def validate(self, params: SamplingParams) -> None:
        spec = params.speculation
        if spec is not None and spec.method != "off" and spec.method not in self.proposers:
            raise InvalidRequestError(f"speculative method {spec.method!r} is not served here: this server has "
                                      f"{', '.join(self.proposers) or 'no'} proposers (--speculative-model for draft)")

    def _method(self, params: SamplingParams) -> tuple[str, int]:
        spec = params.speculation
        if spec is None:
            return self.default_method, self.default_tokens
        return spec.method, spec.num_tokens or self.default_tokens

    def wants(self, seq: Sequence) -> bool:
        """Whether seq speculates when it decodes. Not where sampling needs host state per token (grammar, penalties,
        logit bias, min_tokens still pending, prompt logprobs): those requests decode one token a step."""
        p = seq.params
        method, _ = self._method(p)
        return (method in self.proposers and not seq.prefill_only and seq.grammar is None and not p.penalized
                and not p.logit_bias and p.prompt_logprobs is None
                and seq.num_tokens - seq.num_prompt_tokens >= max(1, p.min_tokens))

    def active(self, batch_size: int) -> bool:
        """Whether a step of this many running requests speculates at all (disable_by_batch_size)."""
        return self.disable_by_batch_size is None or batch_size <= self.disable_by_batch_size

    def speculates_next(self, seq: Sequence, batch_size: int) -> bool:
        """Whether seq's next step should verify proposed tokens, and so run synchronously: it speculates and its
        proposer expects a guess. A draft model always guesses; n-gram lookup says no while the output copies
        nothing, so those steps keep async scheduling's overlap."""
        if not self.active(batch_size) or not self.wants(seq):
            return False
        return self.proposers[self._method(seq.params)[0]].expects_proposal(seq)

    def proposes_in_flight(self, seq: Sequence) -> bool:
        """Whether seq's proposer can guess before seq's last id reaches the host (see Proposer)."""
        return self.proposers[self._method(seq.params)[0]].proposes_in_flight

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Appends each speculating request's proposed tokens to its token_ids (num_draft says how many)."""
        self._draft_probs.clear()  # of proposals the scheduler dropped last step
        if not self.active(len(running)):
            return
        by_method: dict[str, list[tuple[Sequence, int]]] = {}
        for seq in running:
            if seq.num_uncomputed != 1 or not self.wants(seq):
                continue
            method, k = self._method(seq.params)
            # The step emits up to k + 1 tokens: none past max_tokens nor the context.
            k = min(k, seq.params.max_tokens - (seq.num_tokens - seq.num_prompt_tokens) - 1,
                    max_model_len - 1 - seq.num_tokens)
            if k > 0:
                by_method.setdefault(method, []).append((seq, k))
        for method, requests in by_method.items():
            for (seq, _), proposal in zip(requests, self.proposers[method].propose(requests)):
                if not proposal.tokens:
                    continue
                seq.token_ids.extend(proposal.tokens)
                seq.num_draft = len(proposal.tokens)
                if proposal.probs is not None:
                    self._draft_probs[seq.request_id] = proposal.probs

    def forget(self, request_id: str) -> None:
        self._draft_probs.pop(request_id, None)
        for proposer in self.proposers.values():
            proposer.forget(request_id)

    def verify(self, seqs: list[Sequence], logits: torch.Tensor, generators: list[torch.Generator | None]
               ) -> list[Verified]:
        """logits: 1 + num_draft rows per sequence, in order (the target at each proposed token, then the bonus
        position). Greedy: drafts count while they are the argmax, then the argmax; sampled: accept draft x with
        probability min(1, p(x) / q(x)), else draw from max(0, p - q) renormalised (q: the draft's distribution,
        a point mass for a deterministic proposal); all accepted: one more token from p."""
        k = max((s.params.top_logprobs for s in seqs), default=0)
        if logits.is_cuda and not k and all(s.params.greedy for s in seqs):
            from baton.kernels.greedy_sample import greedy_sample

            host = greedy_sample(logits).tolist()  # ids, then their logprobs: two launches
            raw = None
        else:
            raw = torch.log_softmax(logits.float(), dim=-1)
            best_values, best_ids = raw.max(dim=-1)
            top = raw.topk(k, dim=-1) if k else None
            host = torch.cat([best_ids.double(), best_values.double()] + (
                [top.indices.double().flatten(), top.values.double().flatten()] if top else [])).tolist()
        rows = len(logits)
        argmax, maxlp = [int(t) for t in host[:rows]], host[rows:2 * rows]
        out = []
        row = 0
        for seq, gen in zip(seqs, generators):
            d = seq.num_draft
            drafts = seq.token_ids[len(seq.token_ids) - d:]
            if seq.params.greedy:
                a = 0
                while a < d and drafts[a] == argmax[row + a]:
                    a += 1
                tokens, logprobs = argmax[row:row + a + 1], maxlp[row:row + a + 1]
            else:
                q = self._draft_probs.pop(seq.request_id, None)
                tokens = rejection_sample(logits[row:row + d + 1], drafts, q, seq.params, gen)
                a = len(tokens) - 1
                at = torch.arange(row, row + a + 1, device=logits.device)
                logprobs = raw[at, torch.tensor(tokens, device=logits.device)].tolist()
            tops = []
            if seq.params.top_logprobs:
                want = seq.params.top_logprobs
                ids, values = host[2 * rows:2 * rows + rows * k], host[2 * rows + rows * k:]
                tops = [[(int(ids[r * k + j]), values[r * k + j]) for j in range(want)]
                        for r in range(row, row + a + 1)]
            out.append(Verified(tokens, logprobs, tops, a))
            self.num_drafts += 1
            self.num_draft_tokens += d
            self.num_accepted_tokens += a
            row += d + 1
        return out

    def stats(self) -> SpecStats:
        return SpecStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)


def rejection_sample(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                     params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over d + 1 target rows: the tokens it returns
    are distributed exactly as sampling the target one token at a time."""
    d = len(drafts)
    device = logits.device
    p = torch.stack([filtered_probs(row, params) for row in logits.float()])  # [d + 1, vocab]
    x = torch.tensor(drafts, dtype=torch.long, device=device)
    ratio = p[:d].gather(1, x[:, None])[:, 0]
    if draft_probs is not None:
        ratio = ratio / draft_probs.gather(1, x[:, None])[:, 0].to(ratio)
    accepted = (torch.rand(d, generator=generator, device=device) < ratio).tolist()
    a = accepted.index(False) if False in accepted else d
    if a == d:
        dist = p[d]
    else:
        q = draft_probs[a].to(p) if draft_probs is not None else torch.zeros_like(p[a]).index_fill_(0, x[a:a + 1], 1.0)
        dist = (p[a] - q).clamp_(min=0)
        if not dist.sum() > 0:  # p == q: rejection had probability 0; only rounding lands here
            dist = p[a]
    return drafts[:a] + [int(torch.multinomial(dist, 1, generator=generator)[0])]

"""Token sampling where the logits are (the GPU too): logit bias, min_tokens, presence/frequency/repetition
penalties, grammar masks (structured output), greedy, temperature, min-p, top-k, top-p, per-request seeds;
logprobs of the chosen token with the top alternatives, and prompt logprobs. Everything a step returns comes
back in one device-to-host copy."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from baton.engine.grammar import mask_logits_
from baton.engine.sequence import Sequence

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class PromptScoring:
    """Logits of prompt positions to score (prompt logprobs): row i scores token targets[i]."""

    logits: torch.Tensor  # [m, vocab]
    targets: list[int]
    top_k: int  # alternatives per position, the largest any request asked for


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float]  # of the chosen tokens under the model's raw distribution (as vLLM's default)
    top_logprobs: list[TopLogprobs]  # per row, as many as that request asked for
    prompt_logprobs: list[float]
    prompt_top_logprobs: list[TopLogprobs]  # top_k per prompt row; callers cut to each request's own k


class PendingSample:
    """A launched sampling step: `tokens` on the device at once, everything else on the host after result()."""

    def __init__(self, tokens: torch.Tensor, flat: torch.Tensor, event, wants: list[int], k: int,
                 prompt: PromptScoring | None) -> None:
        self.tokens = tokens
        self._flat, self._event, self._wants, self._k, self._prompt = flat, event, wants, k, prompt

    def wait(self) -> None:
        """Blocks until the step's device work (and its copy to the host) is done."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> SampleResult:
        self.wait()
        flat = self._flat.tolist()
        n, k, prompt = len(self._wants), self._k, self._prompt
        out = SampleResult([int(t) for t in flat[:n]], flat[n:2 * n], [[] for _ in range(n)], [], [])
        at = 2 * n
        if k:
            ids, values = flat[at:at + n * k], flat[at + n * k:at + 2 * n * k]
            at += 2 * n * k
            for row, want in enumerate(self._wants):
                out.top_logprobs[row] = [(int(ids[row * k + j]), values[row * k + j]) for j in range(want)]
        if prompt is not None:
            m, pk = len(prompt.targets), prompt.top_k
            out.prompt_logprobs = flat[at:at + m]
            at += m
            ids, values = flat[at:at + m * pk], flat[at + m * pk:at + 2 * m * pk]
            out.prompt_top_logprobs = [[(int(ids[i * pk + j]), values[i * pk + j]) for j in range(pk)]
                                       for i in range(m)]
        return out


class Sampler:
    def __init__(self, seed: int = 0, eos_token_ids: Iterable[int] = ()) -> None:
        self._seed = seed
        self._eos = sorted(set(eos_token_ids))
        self._defaults: dict[torch.device, torch.Generator] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._prompt_masks: dict[str, torch.Tensor] = {}  # repetition penalty: which ids the prompt holds
        self._pinned: list[torch.Tensor | None] = [None, None, None]
        self._turn = 0

    def _staging(self, numel: int) -> torch.Tensor:
        """A pinned host buffer for one step's results, from three used in turn: with async scheduling one may
        still be read by the host and one written by the device; none is allocated per step (a fresh pinned
        allocation can stall the host)."""
        self._turn = (self._turn + 1) % 3
        buf = self._pinned[self._turn]
        if buf is None or buf.numel() < numel:
            buf = self._pinned[self._turn] = torch.empty(max(numel, 4096), dtype=torch.float64, pin_memory=True)
        return buf[:numel]

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._prompt_masks.pop(request_id, None)

    def generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        params = seq.params
        if params.seed is None:
            gen = self._defaults.get(device)
            if gen is None:
                gen = self._defaults[device] = torch.Generator(device).manual_seed(self._seed)
            return gen
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = torch.Generator(device).manual_seed(params.seed)
        return gen

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], prompt: PromptScoring | None = None) -> SampleResult:
        """logits: [n, vocab], one row per sequence that samples now."""
        return self.launch(logits, seqs, prompt).result()

    def launch(self, logits: torch.Tensor, seqs: list[Sequence], prompt: PromptScoring | None = None
               ) -> "PendingSample":
        """Queues the sampling on the logits' device and starts the one device-to-host copy; the host waits only
        in PendingSample.result(). The sampled ids stay on the device too (`tokens`), so a next step can be
        launched from them before they reach the host."""
        if logits.is_cuda and prompt is None and seqs and self._plain_greedy(seqs):
            from baton.kernels.greedy_sample import greedy_sample

            flat = greedy_sample(logits)  # ids, then their logprobs: two launches instead of about eight
            return self._copy_back(flat[: len(seqs)].long(), flat, seqs, 0, None)
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits, seqs)
        tokens = logits.argmax(dim=-1)
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                probs = filtered_probs(logits[row], seq.params)
                tokens[row] = torch.multinomial(probs, 1, generator=self.generator(seq, logits.device))[0]
        parts = [tokens.double(), raw.gather(1, tokens[:, None])[:, 0].double()]
        k = max((s.params.top_logprobs for s in seqs), default=0)
        if k:
            top = raw.topk(k, dim=-1)
            parts += [top.indices.double().flatten(), top.values.double().flatten()]
        if prompt is not None:
            scored = torch.log_softmax(prompt.logits.float(), dim=-1)
            targets = torch.tensor(prompt.targets, dtype=torch.long, device=scored.device)
            parts.append(scored.gather(1, targets[:, None])[:, 0].double())
            if prompt.top_k:
                ptop = scored.topk(prompt.top_k, dim=-1)
                parts += [ptop.indices.double().flatten(), ptop.values.double().flatten()]
        # float64 holds every token id exactly, so one copy (one host sync) brings everything back.
        return self._copy_back(tokens, torch.cat(parts), seqs, k, prompt)

    def _copy_back(self, tokens: torch.Tensor, flat: torch.Tensor, seqs: list[Sequence], k: int,
                   prompt: PromptScoring | None) -> "PendingSample":
        event = None
        if flat.is_cuda:
            host = self._staging(flat.numel())
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flat = host
        return PendingSample(tokens, flat, event, [s.params.top_logprobs for s in seqs], k, prompt)

    def _plain_greedy(self, seqs: list[Sequence]) -> bool:
        """Every row takes the argmax of the raw logits and asks for no alternatives: what _process would leave
        unchanged (no bias, no min_tokens ban, no penalties, no grammar)."""
        for seq in seqs:
            p = seq.params
            if not p.greedy or p.top_logprobs or p.logit_bias or p.penalized or seq.grammar is not None:
                return False
            if len(seq.output_ids) < p.min_tokens:
                return False
        return True

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logit bias, min_tokens and penalties, batched over the rows that ask for them."""
        vocab, device = logits.shape[1], logits.device
        rows, cols, values = [], [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    rows.append(row), cols.append(token), values.append(bias)
            # A grammar decides alone when its output may end: banning EOS could leave it no token at all.
            if len(seq.output_ids) < p.min_tokens and seq.grammar is None:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self._eos))
                for token in banned:
                    if token < vocab:
                        rows.append(row), cols.append(token), values.append(float("-inf"))
        penalized = [row for row, seq in enumerate(seqs) if seq.params.penalized]
        constrained = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows and not penalized and not constrained:
            return logits
        logits = logits.clone()
        if rows:
            index = torch.tensor([rows, cols], dtype=torch.long, device=device)
            logits.index_put_((index[0], index[1]), torch.tensor(values, dtype=logits.dtype, device=device),
                              accumulate=True)
        if penalized:
            logits[penalized] = self._penalize(logits[penalized], [seqs[r] for r in penalized])
        if constrained:  # last: no bias or penalty may lift a token the grammar forbids
            mask_logits_(logits, constrained, [seqs[r].grammar for r in constrained])
        return logits

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties as vLLM (and OpenAI for presence/frequency) define them, over output (and prompt) tokens."""
        m, vocab = logits.shape
        device = logits.device
        outputs = [seq.output_ids for seq in seqs]
        longest = max(1, max(len(o) for o in outputs))
        # Pad with an id one past the vocabulary, into a column that is dropped again.
        padded = torch.tensor([o + [vocab] * (longest - len(o)) for o in outputs], dtype=torch.long, device=device)
        counts = torch.zeros(m, vocab + 1, device=device).scatter_add_(1, padded, torch.ones_like(padded,
                                                                                                   dtype=torch.float))
        counts = counts[:, :vocab]

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(s.params, name) for s in seqs], device=device)[:, None]

        seen = counts > 0
        if any(seq.params.repetition_penalty != 1 for seq in seqs):  # decided on the host: no device sync
            repetition = column("repetition_penalty")
            seen = seen | torch.stack([self._prompt_mask(seq, vocab, device) for seq in seqs])
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)

    def _prompt_mask(self, seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
        mask = self._prompt_masks.get(seq.request_id)
        if mask is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in seq.prompt_ids if t < vocab], dtype=torch.long, device=device)
            mask[ids] = True
            self._prompt_masks[seq.request_id] = mask
        return mask


def filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
